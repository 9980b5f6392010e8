"""The host paths a run needs inside a container (pyxis/enroot), the `--container-mounts` that carry
them, and the check -- run inside the container before training -- that they arrived.

    python -m vlm_train.parallel.container_paths needs   [--cwd DIR] OVERRIDES...
    python -m vlm_train.parallel.container_paths mounts  [--cwd DIR] [--given SPEC] (--needs FILE | OVERRIDES...)
    python -m vlm_train.parallel.container_paths verify  --token T --mounts SPEC [--cwd DIR] OVERRIDES...

`needs` composes the config (Hydra: run it where vlm_train's configs are the ones that will train,
i.e. in the image) and prints one `rw PATH` / `ro PATH` line per path the run reads or writes.
`mounts` runs on the host (standard library only, so any Python >= 3.10 with this checkout on its
path will do): it creates the writable directories, refuses a read path the host does not have,
and prints the pyxis mount list -- every path at the same path, nested ones collapsed -- or checks
a user-given list (CONTAINER_MOUNTS) covers them. `verify` runs inside the container on every
node: each path exists, the writable ones take a file, the token the host wrote under run.dir
reads back, and vlm_train is the image's (not a host checkout mounted in) unless
VLM_TRAIN_HOST_CODE=1. Every failure is one line, `vlm-train: error: ...`, and exit 2.

Relative paths resolve against `--cwd` (default: the working directory), which slurm/container.sh
makes the submit directory both outside and inside the container.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlm_train.errors import UserError, report

if TYPE_CHECKING:
    from vlm_train.config import Config

TOKEN_FILE = ".vlm-container-token"  # written by the host into run.dir, read back inside
HOST_CODE_ENV = "VLM_TRAIN_HOST_CODE"  # "1": the host checkout is meant to run, not the image's code
IMAGE_HOME_ENV = "VLM_TRAIN_IMAGE_HOME"  # set by docker/Dockerfile: where the image installed vlm_train
_GLOB = "{*?["  # the first of these ends the literal directory part of a shard pattern


class ContainerError(UserError):
    """A path the run needs that the container would not see, or would see as another directory."""


@dataclass(frozen=True)
class Need:
    """One host path the run needs: the config key it comes from and whether the run writes it."""

    key: str
    path: str  # absolute and normalised
    writable: bool

    def line(self) -> str:
        return f"{'rw' if self.writable else 'ro'} {self.path} {self.key}"


@dataclass(frozen=True)
class Mount:
    """One pyxis mount: `src:dst[:flags]` (a bare `src` mounts it at the same path)."""

    src: str
    dst: str
    flags: str = ""

    @classmethod
    def parse(cls, entry: str) -> Mount:
        src, _, rest = entry.strip().partition(":")
        dst, _, flags = rest.partition(":")
        return cls(os.path.normpath(src), os.path.normpath(dst or src), flags)

    @property
    def read_only(self) -> bool:
        return "ro" in self.flags.split("+")

    def spec(self) -> str:
        return ":".join([self.src, self.dst] + ([self.flags] if self.flags else []))


# --- from a config to the paths it needs ----------------------------------------------------------


def shard_dir(url: str) -> str | None:
    """The local directory holding a shard pattern's files (`/d/x/{000..009}.tar` -> `/d/x`), or
    None for a remote source (`pipe:`, `s3://`, `https://`) that no mount can carry."""
    if url.startswith("file:"):
        url = url.removeprefix("file:").removeprefix("//")
    elif url.startswith("pipe:") or "://" in url:
        return None
    cut = min((i for i in (url.find(c) for c in _GLOB) if i >= 0), default=len(url))
    literal = url[:cut]
    # "/d/x/{0..9}.tar" -> "/d/x"; "/d/x-{0..9}/a.tar" and "/d/a.tar" -> "/d"
    return literal.rstrip("/") if literal.endswith("/") else os.path.dirname(literal)


def needs_from_config(cfg: Config, cwd: str) -> list[Need]:
    """Every local path of the config: written (run.dir, data.synthetic_dir, data.log_keys) or read
    (shards, model and tokenizer folders, connector weights). Relative ones resolve against cwd."""
    data = cfg.data
    written = {"run.dir": cfg.run.dir, "data.synthetic_dir": data.synthetic_dir, "data.log_keys": data.log_keys}
    urls = {"data.urls": data.urls, "data.eval_urls": data.eval_urls}
    urls.update({f"data.mixture[{i}].urls": m.urls for i, m in enumerate(data.mixture)})
    read: dict[str, str | None] = {key: shard_dir(url) if url else None for key, url in urls.items()}
    tokenizer = cfg.llm.tokenizer if cfg.llm.tokenizer != "toy" else None
    read.update({"vision.path": cfg.vision.path, "llm.path": cfg.llm.path, "llm.tokenizer": tokenizer})
    read["connector.path"] = getattr(cfg.connector, "path", None)
    needs = [Need(k, _absolute(p, cwd), True) for k, p in written.items() if p]
    needs += [Need(k, _absolute(p, cwd), False) for k, p in read.items() if p is not None]
    return needs


def needs_from_overrides(overrides: Sequence[str], cwd: str) -> list[Need]:
    from vlm_train.config import compose

    return needs_from_config(compose(list(overrides)), cwd)


def read_needs(lines: Iterable[str]) -> list[Need]:
    """Parse `needs` output (`rw|ro PATH KEY` per line)."""
    needs = []
    for line in lines:
        if line.strip():
            mode, path, key = line.split(maxsplit=2)
            needs.append(Need(key.strip(), path, mode == "rw"))
    return needs


def _absolute(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


# --- on the host: the mount list ------------------------------------------------------------------


def prepare_host(needs: Sequence[Need]) -> None:
    """Create the writable directories (as the trainer would) and refuse what cannot be mounted."""
    for need in needs:
        if "," in need.path or ":" in need.path:
            raise ContainerError(
                f"{need.key}: {need.path} has a ',' or ':', which pyxis' --container-mounts cannot carry"
            )
        if need.path == "/":
            raise ContainerError(f"{need.key}: mounting / over the container's root is refused; use a directory")
    for need in needs:
        if need.writable:
            try:
                os.makedirs(need.path, exist_ok=True)
            except OSError as err:
                raise ContainerError(f"{need.key}: cannot create {need.path} on this host ({err.strerror})") from None
            if not os.access(need.path, os.W_OK):
                raise ContainerError(f"{need.key}: {need.path} is not writable on this host")
    for need in needs:
        if not need.writable and not os.path.exists(need.path):
            raise ContainerError(
                f"{need.key}: {need.path} does not exist on this host, so it cannot be mounted into the container"
            )


def derive_mounts(needs: Sequence[Need]) -> list[Mount]:
    """The fewest mounts that carry every need at its own path: a path under another is dropped, a
    mount is read-only when nothing under it is written."""
    roots: list[str] = []
    for path in sorted({n.path for n in needs}):
        if not any(_under(path, root) for root in roots):
            roots.append(path)
    return [
        Mount(root, root, "" if any(n.writable and _under(n.path, root) for n in needs) else "ro") for root in roots
    ]


def check_given(needs: Sequence[Need], given: Sequence[Mount]) -> None:
    """A user's CONTAINER_MOUNTS must carry every need at the same path, writable where written."""
    for need in needs:
        covering = [m for m in given if _under(need.path, m.dst)]
        if not covering:
            raise ContainerError(
                f"CONTAINER_MOUNTS does not mount {need.key} ({need.path}): add {need.path}:{need.path}, "
                "or unset CONTAINER_MOUNTS to have the mounts derived from the config"
            )
        mount = max(covering, key=lambda m: len(m.dst))  # the innermost mount is the one seen
        if mount.src != mount.dst:
            raise ContainerError(
                f"{need.key}: {need.path} is mounted from {mount.src} at {mount.dst}; mount it at the same "
                "path, or the host and the container mean different directories"
            )
        if need.writable and mount.read_only:
            raise ContainerError(
                f"{need.key}: {need.path} is written by the run but mounted read-only ({mount.spec()})"
            )


def mount_spec(mounts: Sequence[Mount]) -> str:
    return ",".join(m.spec() for m in mounts)


def parse_spec(spec: str) -> list[Mount]:
    return [Mount.parse(entry) for entry in spec.split(",") if entry.strip()]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# --- inside the container: the check ----------------------------------------------------------------


def verify(needs: Sequence[Need], mounts: Sequence[Mount], token: str) -> str:
    """Check, from inside the container, what the host prepared; return a one-line summary."""
    for need in needs:
        if not os.path.exists(need.path):
            raise ContainerError(
                f"{need.key}: {need.path} is not visible inside the container (mounts: {mount_spec(mounts)})"
            )
        if need.writable:
            _probe_write(need)
    run_dir = next(n.path for n in needs if n.key == "run.dir")
    _check_token(os.path.join(run_dir, TOKEN_FILE), token)
    code = _check_code(mounts)
    return f"container check ok on {socket.gethostname()}: {len(needs)} paths, token read back in {run_dir}, {code}"


def _probe_write(need: Need) -> None:
    probe = os.path.join(need.path, f".vlm-write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ContainerError(f"{need.key}: {need.path} is not writable inside the container ({err.strerror})") from None


def _check_token(path: str, token: str) -> None:
    try:
        with open(path) as f:
            seen = f.read().strip()
    except OSError:
        seen = None
    if seen != token:
        what = "is missing" if seen is None else "holds another value"
        raise ContainerError(
            f"run.dir: the token the host wrote to {path} {what} inside the container: the run dir there is not "
            "the host's directory (mount it at the same path; see CONTAINER_MOUNTS)"
        )


def _check_code(mounts: Sequence[Mount]) -> str:
    module = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the vlm_train package running
    interpreter = os.path.realpath(sys.executable)
    mounted = [m.dst for m in mounts]
    if os.environ.get(HOST_CODE_ENV) == "1":
        if not any(_under(module, d) for d in mounted):
            raise ContainerError(
                f"{HOST_CODE_ENV}=1 but vlm_train is imported from {module}, not from a mounted host checkout"
            )
        return f"vlm_train from the host checkout {module} ({HOST_CODE_ENV}=1)"
    for what, path in (("vlm_train is imported", module), ("the interpreter is", interpreter)):
        mount = next((d for d in mounted if _under(path, d)), None)
        if mount is not None:
            raise ContainerError(
                f"{what} from {path}, under the host path {mount} mounted into the container, not the image's: "
                f"unset PYTHON/PYTHONPATH (set {HOST_CODE_ENV}=1 to run the host checkout on purpose)"
            )
    image_home = os.environ.get(IMAGE_HOME_ENV)
    if image_home and not _under(module, os.path.realpath(image_home)):
        raise ContainerError(f"vlm_train is imported from {module}, not from the image's install in {image_home}")
    return f"vlm_train from {module}"


# --- the command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlm_train.parallel.container_paths", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("needs", "mounts", "verify"):
        sub = commands.add_parser(name)
        sub.add_argument("--cwd", default=os.getcwd(), help="directory relative paths resolve against")
        sub.add_argument("--needs", dest="needs_file", help="`needs` output to use instead of composing OVERRIDES")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, as given to vlm-train")
        if name == "mounts":
            sub.add_argument("--given", default="", help="a user's CONTAINER_MOUNTS: checked, then printed as it is")
        if name == "verify":
            sub.add_argument("--token", required=True, help="the value the host wrote to <run.dir>/" + TOKEN_FILE)
            sub.add_argument("--mounts", dest="spec", required=True, help="the --container-mounts list in use")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.needs_file:
            with open(args.needs_file) as f:
                needs = read_needs(f)
        else:
            needs = needs_from_overrides(args.overrides, args.cwd)
        if args.command == "needs":
            print("\n".join(n.line() for n in needs))
        elif args.command == "mounts":
            prepare_host(needs)
            if args.given.strip():
                check_given(needs, parse_spec(args.given))
                print(args.given.strip())
            else:
                print(mount_spec(derive_mounts(needs)))
        else:
            print(f"vlm-train: {verify(needs, parse_spec(args.spec), args.token)}")
    except UserError as err:
        return report("vlm-train", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
