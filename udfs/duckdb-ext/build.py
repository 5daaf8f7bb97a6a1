#!/usr/bin/env python3
"""Build threatlake.duckdb_extension for stock DuckDB.

    python3 udfs/duckdb-ext/build.py [--debug] [--out DIR]

Runs `cargo build` in this directory (the `loadable-extension` feature of duckdb-rs: no C++ build),
then appends DuckDB's 534-byte extension metadata footer to the shared library: a WebAssembly custom
section named "duckdb_signature" holding eight 32-byte fields (written last to first: unused x3, ABI
type C_STRUCT, extension version, minimum C API version v1.2.0, platform, metadata version "4") and a
256-byte signature, left empty, so DuckDB loads it with `allow_unsigned_extensions`.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_VERSION = "0.1.0"
MIN_CAPI = "v1.2.0"


def duckdb_platform() -> str:
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    system = {"Linux": "linux", "Darwin": "osx", "Windows": "windows"}[platform.system()]
    return f"{system}_{arch}"


def field(s: str) -> bytes:
    b = s.encode("ascii")
    assert len(b) <= 32, s
    return b.ljust(32, b"\0")


def footer(plat: str) -> bytes:
    name = b"duckdb_signature"
    payload = b"".join(field(f) for f in ["", "", "", "C_STRUCT", EXT_VERSION, MIN_CAPI, plat, "4"])
    payload += b"\0" * 256
    assert len(payload) == 512
    # custom section id 0, LEB128 size of what follows (1 + 16 + 2 + 512 = 531), name, LEB128 512.
    out = b"\x00" + bytes([0x93, 0x04]) + bytes([len(name)]) + name + bytes([0x80, 0x04]) + payload
    assert len(out) == 534
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--debug", action="store_true", help="cargo's dev profile (optimised anyway)")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "data", "extensions"), help="output directory")
    a = ap.parse_args()
    profile = "dev" if a.debug else "release"
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "target"))
    target = os.path.join(target, "duckdb-ext")
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    subprocess.run(["cargo", "build", "--profile", profile], cwd=HERE, env=env, check=True)
    sub = "debug" if profile == "dev" else "release"
    lib = {"Linux": "libthreatlake.so", "Darwin": "libthreatlake.dylib", "Windows": "threatlake.dll"}[platform.system()]
    src = os.path.join(target, sub, lib)
    os.makedirs(a.out, exist_ok=True)
    dst = os.path.join(os.path.abspath(a.out), "threatlake.duckdb_extension")
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    with open(tmp, "ab") as f:
        f.write(footer(duckdb_platform()))
    os.replace(tmp, dst)
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
