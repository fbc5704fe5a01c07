import sys
from pathlib import Path

# Scripts import the top-level modules (model.py, tokenizer.py, ...) from the repository root.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
