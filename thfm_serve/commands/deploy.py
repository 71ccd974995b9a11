"""`thfm deploy k8s --repo REPO --out DIR [--gpu] [--image IMAGE] [--repository-url s3://...|gs://...|pvc]`."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ThfmError

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("deploy", help="deployment manifests for a Triton fleet serving a model repository")
    targets = p.add_subparsers(dest="platform", metavar="PLATFORM", required=True)
    k = targets.add_parser("k8s", help="Kubernetes: Deployment, headless Service, HPA, PodMonitor, adapter rules")
    k.add_argument("--repo", required=True, help="the exported model repository (read for its models and sizes)")
    k.add_argument("--out", required=True, help="folder for the manifests")
    k.add_argument("--gpu", action="store_true", help="GPU pods (nvidia.com/gpu: 1, GPU metrics)")
    k.add_argument("--image", default=None,
                   help="tritonserver image with thfm_serve installed (default thfm-triton:0.1.0, built from "
                   "nvcr.io/nvidia/tritonserver:24.10-py3 as model_repository/README.md shows)")
    k.add_argument("--repository-url", default=None,
                   help="where pods load the repository from: s3://BUCKET/PATH, gs://BUCKET/PATH or pvc "
                   "(default s3://CHANGE-ME/<repo folder name>)")
    k.add_argument("--name", default="thfm-triton", help="name of the resources (and of the headless Service)")
    k.add_argument("--namespace", default=None, help="namespace to put in the manifests (default: none)")
    k.add_argument("--replicas", type=int, default=1, help="minimum replicas")
    k.add_argument("--max-replicas", type=int, default=4, help="maximum replicas for the autoscaler")
    k.add_argument("--target-queue-ratio", type=float, default=0.5,
                   help="autoscaler target: the entry model's queue time over its compute time (default 0.5)")
    k.add_argument("--credentials-secret", default="thfm-model-repository-credentials",
                   help="Secret with object-store credentials (optional in the pod)")
    k.add_argument("--pvc-size", default=None, help="with --repository-url pvc: claim size (default: repo size + 1Gi)")
    k.add_argument("--storage-class", default=None, help="with --repository-url pvc: storage class")
    k.add_argument("--cpu", default=None, help="CPU request per pod (default 4, or 2 with --gpu)")
    k.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the offline schema checks of what was written")
    k.set_defaults(func=run)


def run(args) -> int:
    from ..deploy.k8s import DEFAULT_IMAGE, DeployOptions, manifests, write_manifests

    opts = DeployOptions(repo=Path(args.repo), gpu=args.gpu, image=args.image or DEFAULT_IMAGE,
                         repository_url=args.repository_url, name=args.name, namespace=args.namespace,
                         replicas=args.replicas, max_replicas=args.max_replicas,
                         target_queue_ratio=args.target_queue_ratio, credentials_secret=args.credentials_secret,
                         pvc_size=args.pvc_size, storage_class=args.storage_class, cpu=args.cpu)
    docs = manifests(opts)
    if args.validate:
        try:
            from ..deploy.validate import validate_documents
        except ImportError:  # pragma: no cover - the deploy extra brings the validators
            raise ThfmError("validating needs the deploy extra (pip install 'thfm-serve[deploy]'), "
                            "or pass --no-validate") from None
        for line in validate_documents(docs):
            logger.info("valid: %s", line)
    paths = write_manifests(opts, args.out, docs)
    logger.info("wrote %d files to %s (kubectl apply -f %s)", len(paths), args.out, Path(args.out) / "all.yaml")
    if args.image is None:
        logger.warning("image %s: build it from %s with thfm_serve installed (model_repository/README.md), "
                       "or pass --image", DEFAULT_IMAGE, "nvcr.io/nvidia/tritonserver:24.10-py3")
    return 0
