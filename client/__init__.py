"""THFM Serve client: run THFM through Triton Inference Server over gRPC.

    from thfm_serve.client import ThfmClient          # blocking (tritonclient.grpc)
    from thfm_serve.client import AsyncThfmClient     # asyncio (tritonclient.grpc.aio)

Both take one or more "HOST:PORT" gRPC endpoints, read the entry model's window size from its config,
cut long clips into overlapping windows (the server's windowing policy, thfm_serve.contract.windows), spread them over the servers (retrying a failed window on
another server), and stitch the answers into the arrays the in-process pipeline produces.
The `thfm predict VIDEO --url HOST:PORT` command is command.run_remote.
"""

from .aio import AsyncThfmClient
from .core import Prediction
from .resolve import expand_urls, resolve_url
from .sync import ThfmClient
from thfm_serve.contract.windows import ClipWindow, default_overlap, plan_windows
from .wire import ServerInfo

__all__ = ["AsyncThfmClient", "ClipWindow", "Prediction", "ServerInfo", "ThfmClient", "default_overlap",
           "expand_urls", "plan_windows", "resolve_url"]
