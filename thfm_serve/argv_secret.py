"""Keep secrets off tritonserver's command line.

tritonserver 2.51 takes the restricted-API key only as a flag (`--grpc-restricted-protocol=
<apis>:<header>=<key>`); it reads no file or variable for it. A process's arguments are readable by
every local user (`ps`, /proc/<pid>/cmdline), and with the key anyone on the host could use the
APIs the server is meant to refuse (shared memory, trace, logging).

So the flag is written with a placeholder and the key travels in an environment variable, which
only the server's own user can read (/proc/<pid>/environ is mode 0400). A small shared object,
preloaded into tritonserver, runs before its main(): it copies the key into a new string, points
the argument at that string, and wipes the variable. The kernel's copy of the arguments, which is
what /proc/<pid>/cmdline shows, keeps the placeholder; tritonserver parses the key. If the object
is not loaded, tritonserver would see the placeholder itself, so the object also refuses to start
a process whose arguments hold a placeholder without a key (fail closed), and `TritonServer.start`
checks the running server's cmdline.

The object is compiled once per source hash with the system C compiler (`cc`, or $CC) into the
venv's backend directory; there is nothing to compile on a host that never restricts an API.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import ServerError

log = logging.getLogger(__name__)

PLACEHOLDER = "@THFM_SECRET@"
ENV_NAME = "THFM_TRITON_SECRET"

_SOURCE = r"""
/* Preloaded into tritonserver by thfm_serve.argv_secret: replaces the placeholder in its arguments
   with the secret from the environment before main() runs. glibc passes argc/argv/envp to ELF
   constructors; changing argv[i] changes what main() sees, not the memory /proc/<pid>/cmdline shows. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PLACEHOLDER "@PLACEHOLDER@"
#define ENV_NAME "@ENV_NAME@"

__attribute__((constructor)) static void thfm_fill_secret(int argc, char **argv, char **envp) {
    (void)envp;
    char *value = getenv(ENV_NAME);
    size_t plen = strlen(PLACEHOLDER);
    if (value == NULL || *value == '\0') {
        for (int i = 1; i < argc; i++)
            if (strstr(argv[i], PLACEHOLDER) != NULL) {
                static const char msg[] = "thfm: a secret placeholder in the arguments but no " ENV_NAME "\n";
                (void)!write(2, msg, sizeof msg - 1);
                _exit(78);
            }
        unsetenv(ENV_NAME);
        return;
    }
    char *secret = strdup(value);
    if (secret == NULL) _exit(71);
    size_t slen = strlen(secret);
    memset(value, 'x', slen);  /* wipe it from the environment block (/proc/<pid>/environ) */
    for (int i = 1; i < argc; i++) {
        char *at = strstr(argv[i], PLACEHOLDER);
        if (at == NULL) continue;
        size_t head = (size_t)(at - argv[i]), tail = strlen(at + plen);
        char *out = malloc(head + slen + tail + 1);
        if (out == NULL) _exit(71);
        memcpy(out, argv[i], head);
        memcpy(out + head, secret, slen);
        memcpy(out + head + slen, at + plen, tail + 1);
        argv[i] = out;
    }
    /* The python-backend stubs do not inherit the variable (they keep the preload, which then does nothing). */
    unsetenv(ENV_NAME);
}
""".replace("@PLACEHOLDER@", PLACEHOLDER).replace("@ENV_NAME@", ENV_NAME)


def shim_path(cache_dir: Path) -> Path:
    """The compiled shared object (built on first use)."""
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"thfm_argv_secret-{digest}.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ServerError("restricting tritonserver APIs needs a C compiler (cc) once, to build the helper that "
                          "keeps the key off tritonserver's command line; install one (apt-get install gcc) or "
                          "serve with restricted_apis=()")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "argv_secret.c"
        src.write_text(_SOURCE)
        built = Path(tmp) / out.name
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(built), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServerError(f"building {out.name} with {cc} failed:\n{proc.stderr[-2000:]}")
        os.replace(built, out)  # atomic: a server starting meanwhile never loads half a file
    log.info("built %s", out)
    return out


def hide(argv: list[str], env: dict[str, str], secret: str, cache_dir: Path) -> tuple[list[str], dict[str, str]]:
    """argv with `secret` replaced by the placeholder, and env that carries it to the preloaded helper."""
    if not secret or PLACEHOLDER in secret:
        raise ServerError("the secret must be a non-empty string without the placeholder")
    hidden = [a.replace(secret, PLACEHOLDER) for a in argv]
    env = dict(env)
    env[ENV_NAME] = secret
    preload = [str(shim_path(cache_dir))] + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join(preload)
    return hidden, env


def helper_loaded(pid: int) -> bool:
    """Whether the helper is mapped into a process (else it would take the placeholder as the key)."""
    try:
        return "/thfm_argv_secret-" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def cmdline_holds(pid: int, secret: str) -> bool:
    """Whether a process's command line (as any local user reads it) contains `secret`."""
    try:
        return secret.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
