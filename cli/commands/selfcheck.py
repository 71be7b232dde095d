"""`erasekit selfcheck`: start a real ComfyUI with this pack in custom_nodes/ and list the nodes it registered."""
from __future__ import annotations

import argparse
import sys

from ... import NODE_CLASS_MAPPINGS
from ..comfy_server import ComfyError, ComfyServer, locate_comfyui


def register(subparsers) -> None:
    check = subparsers.add_parser("selfcheck",
                                  help="start a real ComfyUI with the pack and list the nodes it registered")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = locate_comfyui()
    print(f"starting ComfyUI from {source} (CPU) ...", flush=True)
    try:
        with ComfyServer(source=source) as client:
            info = client.object_info()
    except ComfyError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    print(f"ComfyUI registered {len(NODE_CLASS_MAPPINGS) - len(missing)} EraseKit node(s):")
    for name in sorted(NODE_CLASS_MAPPINGS):
        if name in info:
            entry = info[name]
            print(f"  {name:32s} {entry.get('display_name', '')}  [{entry.get('category', '')}]")
    if missing:
        print(f"FAILED: not registered: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0
