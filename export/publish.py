"""Publish a folder written by ``save_pretrained`` (or ``export.convert``) to the Hugging Face Hub.

    python -m export.publish out/densenet121_efficient.tv_in1k --repo-id org/densenet121_efficient.tv_in1k

Creates the repo if needed (``HfApi.create_repo``), uploads the folder (``HfApi.upload_folder``) and prints the
commit to pin in ``weights_manifest.json``, with the entry's ``hub`` block filled in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from densenet_efficient.pretrained.files import file_sha256
from densenet_efficient.pretrained.loading import WEIGHTS_FILENAME


def publish(folder: Path, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
            private: bool = False, message: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id`` (created if missing); returns the new commit's full hash."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder,
                               commit_message=message or f"Upload {folder.name} with densenet_efficient")
    return commit.oid


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder with model.safetensors, config.json and README.md")
    parser.add_argument("--repo-id", required=True, help="org/name on the Hub")
    parser.add_argument("--endpoint", help="Hub address (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--message", help="commit message")
    args = parser.parse_args(argv)
    if not (args.folder / WEIGHTS_FILENAME).is_file():
        parser.error(f"{args.folder} has no {WEIGHTS_FILENAME}: write it with save_pretrained or export.convert")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commit = publish(args.folder, args.repo_id, endpoint=args.endpoint, token=args.token, private=args.private,
                     message=args.message)
    weights = args.folder / WEIGHTS_FILENAME
    print(f"commit: {commit}")
    print(json.dumps({"hub": {"repo_id": args.repo_id, "revision": commit, "filename": WEIGHTS_FILENAME,
                              "sha256": file_sha256(weights), "size": weights.stat().st_size}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
