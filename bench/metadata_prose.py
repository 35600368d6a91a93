"""Second real-text input for the codec benchmark: prose paragraphs from the package
descriptions (dist-info METADATA) installed next to this project, as prompt/response records.

    python bench/metadata_prose.py --out /tmp/prose.jsonl [--max 80]
    python bench/bench_codec.py --data /tmp/prose.jsonl --blocks sample --out bench/results/codec_prose.json

The bundled chats are short instruction/answer pairs; this checks that the codec's figures are
not an artefact of them. Paragraphs are kept when they read as prose (over 300 characters and
40 spaces, no code, markup or URLs), at most two per package, the first 900 characters of each,
in a fixed shuffled order. The text is human-written but depends on the installed packages, so
the record ids carry the dist-info name (package and version).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sysconfig
from pathlib import Path

CODE_OR_MARKUP = re.compile(r"[{}<>|`=#\[\]]|http")


def prose_paragraphs(site_packages: Path, per_package: int = 2, max_chars: int = 900) -> list[tuple[str, str]]:
    """-> [(dist-info name, paragraph)] in sorted package order."""
    out = []
    for meta in sorted(site_packages.glob("*.dist-info/METADATA")):
        body = meta.read_text(errors="ignore").split("\n\n", 1)[-1]  # skip the RFC 822 headers
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        keep = [p for p in paras if len(p) > 300 and p.count(" ") > 40 and not CODE_OR_MARKUP.search(p)]
        out += [(meta.parent.name, p[:max_chars]) for p in keep[:per_package]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max", type=int, default=80, help="records to keep")
    ap.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    args = ap.parse_args()
    paras = prose_paragraphs(args.site_packages)
    random.Random(0).shuffle(paras)
    paras = paras[: args.max]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for i, (dist, text) in enumerate(paras):
            rec = {"id": f"prose-{i}-{dist}", "prompt": "Continue the text.", "response": text}
            f.write(json.dumps(rec) + "\n")
    print(f"{len(paras)} prose records from {args.site_packages} -> {args.out}")


if __name__ == "__main__":
    main()
