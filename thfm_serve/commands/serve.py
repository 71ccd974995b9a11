"""`thfm serve --repo DIR`: run the real tritonserver on a THFM model repository, in the foreground.

Waits until every model is loaded, logs the endpoints, and stops the server cleanly on SIGINT or
SIGTERM (thfm_serve.server.serve_forever). Binds loopback unless --host says otherwise: the server
has no authentication.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ServerError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a THFM model repository with tritonserver (foreground; Ctrl-C stops it)")
    p.add_argument("--repo", required=True, help="model repository written by `thfm export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the unauthenticated server)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-control", choices=("none", "explicit"), default="none",
                   help="'explicit' also enables the load/unload API (default: none)")
    p.add_argument("--on-stub-death", choices=("restart", "exit"), default="restart",
                   help="when a model's python-backend process dies (tritonserver 2.51 never restarts it, so "
                   "that model would fail every request): restart the server in place (default), or stop and "
                   "exit with status 70 for a supervisor to restart")
    p.add_argument("--log", help="tritonserver log file (default: a temporary file, removed on a clean stop)")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for every model to load")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..options import ServeOptions
    from ..repository import check_repository
    from ..server import serve_forever

    opts = ServeOptions.from_args(args).validate()
    repo = Path(opts.repo)
    manifest = check_repository(repo)
    if manifest.get("target") != "cpu":
        # The tritonserver bundled here has only the python backend; a gpu repository's core is a
        # TensorRT plan and its VAE runs in the onnxruntime backend.
        raise ServerError(
            f"{repo} is a {manifest.get('target')!r} repository (TensorRT core, onnxruntime VAE): serve it with "
            "NVIDIA's Triton container (see model_repository/README.md), or export with --target cpu"
        )
    logger.info("serving %s (%s, %s): %s", repo, manifest.get("target"), manifest.get("precision"),
                ", ".join(manifest.get("models", [])))
    limits = manifest.get("limits") or {}
    if limits:
        # Operators should see the caps in force (set them with `thfm export --max-request-*`).
        logger.info("request limits: %s", ", ".join(f"{k}={v}" for k, v in limits.items()))
    return serve_forever(opts.server_config(), log_path=Path(opts.log) if opts.log else None,
                         start_timeout_s=opts.start_timeout, on_stub_death=opts.on_stub_death)
