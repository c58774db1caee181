"""``python -m onnxlw``."""

from .cli import main

raise SystemExit(main())
