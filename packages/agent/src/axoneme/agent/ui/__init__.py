"""``axoneme ui``: the web UI (service map, policy editor, what-if, recommendations).

The front-end lives in ``ui/`` at the repository root and is built (Vite) into
``static/`` here, which git ignores and the wheel ships (docs/ui.md). The
server (``_server``) needs aiohttp, the agent extra: import it only to serve.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"


def bundle_problem(static_dir: Path = STATIC_DIR) -> str | None:
    """Why the built front-end cannot be served, or None."""
    if not (static_dir / "index.html").is_file():
        return (f"the UI is not built ({static_dir}/index.html is missing): run scripts/bootstrap, "
                f"or `npm ci && npm run build` in ui/")
    return None


__all__ = ["STATIC_DIR", "bundle_problem"]
