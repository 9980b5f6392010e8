"""Resolve docker/Dockerfile's install step without the image: our pins and requirements together
with the NGC image's own pip constraints, as `pip install --dry-run`.

    python docker/dry_run.py [--ngc docker/ngc-26.05-constraints.txt] [--report FILE]

The base image's packages are not all on the package index (torch is NVIDIA's own build,
2.12.0a0+<commit>.nv26.05): each pin with a local version label becomes a metadata-only stub
wheel, standing for the installed package, in a --find-links folder. Everything else is resolved
from the index as the build would. Prints the resolved set; exits non-zero with pip's reason when
the pins cannot be met together. Differences from the real build: this runs on the interpreter
it is started with (the image has Python 3.12), and it knows only the NGC pins written down in
the constraints file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# What NVIDIA's torch build declares (pure-Python runtime dependencies; the CUDA libraries are in
# the image, not wheels): torch's own setup.py install_requires.
STUB_REQUIRES = {"torch": ["filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", "networkx", "jinja2", "fsspec"]}


def stub_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    dist = f"{name.replace('-', '_')}-{version}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    metadata = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    )
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", metadata + "\n")
        zf.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: vlm_train\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def resolve(ngc: Path, work: Path) -> dict:
    subprocess.run([sys.executable, str(HERE / "pins.py"), str(work)], cwd=REPO, check=True)
    stubs = work / "stubs"
    stubs.mkdir()
    for line in ngc.read_text().splitlines():
        spec = line.split("#")[0].strip()
        if "==" in spec and "+" in spec:  # a build of NVIDIA's own: not on the index
            name, version = spec.split("==")
            stub_wheel(stubs, name.strip(), version.strip(), STUB_REQUIRES.get(name.strip(), []))
    report = work / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    command += ["--report", str(report), "--find-links", str(stubs)]
    command += ["-c", str(ngc), "-c", str(work / "pins.txt"), "-r", str(work / "requirements.txt")]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(
            f"docker/dry_run.py: the Dockerfile's install step does not resolve against {ngc.name}:\n{result.stderr}"
        )
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ngc", type=Path, default=HERE / "ngc-26.05-constraints.txt")
    parser.add_argument("--report", type=Path, help="also write pip's JSON report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = resolve(args.ngc.resolve(), Path(tmp))
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))
    for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
        print(f"{item['metadata']['name']}=={item['metadata']['version']}")


if __name__ == "__main__":
    main()
