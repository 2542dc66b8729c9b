"""`python -m llmpress.cli`: the `llmpress` command."""

import sys

from llmpress.cli import main

sys.exit(main())
