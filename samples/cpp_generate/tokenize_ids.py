"""Text <-> token ids with the exported folder's tokenizer.json, for hqexport_generate.

    python tokenize_ids.py OUT "The old lighthouse keeper"       # -> 314,69,260,...
    python tokenize_ids.py OUT --decode 262 169 112              # -> text
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("text", nargs="*")
    parser.add_argument("--decode", action="store_true", help="the arguments are token ids: print their text")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.folder / "tokenizer.json"))
    if args.decode:
        ids = [int(part) for arg in args.text for part in arg.replace(",", " ").split()]
        print(tokenizer.decode(ids))
    else:
        print(",".join(map(str, tokenizer.encode(" ".join(args.text)).ids)))


if __name__ == "__main__":
    main()
