"""Write the manifest that lets training read shards made elsewhere (lit-gpt's, TinyLlama's, or ours copied without
theirs): every `*.bin` file of the directory is checked (header and size) and scanned once, memory-mapped, for its
token count and max token id; the result goes to `DIR/manifest.json`, atomically.

    python prepare_data/write_manifest.py --directory data/slim_star_combined

The preparers write their own manifests (`manifest_{run}.json`); run this only for files no preparer run here wrote
completely. The vocabulary of such files is unknown: training checks their max token id against the model's
vocab_size.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shard_format import write_manifest
from utils import cli


def main(directory: Path) -> Path:
    """Scan every .bin file of `directory` and write directory/manifest.json; return its path.

    Args:
        directory: the directory of the .bin shards
    """
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--directory {str(directory)!r} is not a directory of .bin shards")
    path = write_manifest(directory)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    cli(main, description=__doc__)
