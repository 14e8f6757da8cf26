"""Publish a folder written by ``save_pretrained`` (or ``export.convert``) to the Hugging Face Hub.

    python -m export.publish out/densenet121_efficient.tv_in1k --repo-id org/densenet121_efficient.tv_in1k

Creates the repo if needed (``HfApi.create_repo``), uploads exactly the files the folder's model card lists
(``model.safetensors``, ``config.json``, ``README.md``) in one commit and prints the commit to pin in
``weights_manifest.json``, with the entry's ``hub`` block filled in. A folder that holds anything else (a stray
or private file, a leftover of an interrupted save) is refused before anything is uploaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from densenet_efficient.pretrained.loading import WEIGHTS_FILENAME
from densenet_efficient.pretrained.saving import CARD_FILENAME


def publish(
    folder: Path,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    message: str | None = None,
) -> str:
    """Upload the files ``folder``'s card lists to ``repo_id`` (created if missing) in one commit; returns it."""
    from huggingface_hub import HfApi, ModelCard

    card = folder / CARD_FILENAME  # exactly the files the card lists, checked before any request
    if not card.is_file():
        raise SystemExit(f"{folder} has no {CARD_FILENAME}: write the folder with save_pretrained or export.convert")
    files = list(ModelCard(card.read_text(encoding="utf-8")).data.to_dict().get("files", []))
    if not files:
        raise SystemExit(f"{card} lists no files: write the folder with save_pretrained or export.convert")
    present = {path.name for path in folder.iterdir()}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing or extra:
        raise SystemExit(
            f"{folder} must hold exactly the files its card lists ({', '.join(files)}): missing {missing}, "
            f"not listed {extra} (move them out)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    message = message or f"Upload {folder.name} with densenet_efficient"
    return api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=files, commit_message=message).oid


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder with model.safetensors, config.json and README.md")
    parser.add_argument("--repo-id", required=True, help="org/name on the Hub")
    parser.add_argument("--endpoint", help="Hub address (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--message", help="commit message")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commit = publish(
        args.folder, args.repo_id, endpoint=args.endpoint, token=args.token, private=args.private, message=args.message
    )
    weights = args.folder / WEIGHTS_FILENAME
    print(f"commit: {commit}")
    sha256, size = hashlib.sha256(weights.read_bytes()).hexdigest(), weights.stat().st_size
    hub = {"repo_id": args.repo_id, "revision": commit, "filename": WEIGHTS_FILENAME, "sha256": sha256, "size": size}
    print(json.dumps({"hub": hub}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
