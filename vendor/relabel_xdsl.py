"""Make vendor/xdsl-0.28.0+te413-py3-none-any.whl from PyPI's xdsl 0.28.0 wheel.

Why this exists: the LiteRT stack (litert-torch 0.10 -> litert-converter 0.5 and
ai-edge-litert[model-utils] 2.3) pins ``xdsl==0.28.0``, whose metadata says
``typing-extensions<4.13``; apache-tvm-ffi (TVM) needs ``typing-extensions>=4.13`` (it imports
``typing_extensions.get_annotations``). pip cannot resolve that set, and no litert-torch that
accepts torch 2.13 allows another xdsl (google-ai-edge/LiteRT#8894). The upper bound was a
CI precaution of xdsl's (xdslproject/xdsl#2638); xdsl 0.28.0 imports and works with
typing-extensions 4.16, and evit-deploy's LiteRT export does not even import it.

The copy written here is PyPI's wheel with two lines of ``METADATA`` changed (the version
gets the local label ``+te413`` and the typing-extensions bound loses its upper limit) and
``RECORD`` rehashed; every other file is copied byte for byte, with its original date, so
running the script again gives the same file. Under PEP 440 the pin ``xdsl==0.28.0``
matches ``0.28.0+te413``, so pip takes this wheel when it is on ``--find-links vendor``
and ``pip check`` stays clean.

Usage: pip download --no-deps xdsl==0.28.0 -d /tmp/x && python vendor/relabel_xdsl.py /tmp/x/xdsl-0.28.0-py3-none-any.whl
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path

SOURCE_SHA256 = "3ce2427f23b45f60cdaad0204a4e6520aa4433bbbc4a9c7d16b1107c9750ef86"   # PyPI's xdsl-0.28.0-py3-none-any.whl
VERSION, LOCAL = "0.28.0", "0.28.0+te413"
PIN, RELAXED = "Requires-Dist: typing-extensions<4.13,>=4.7", "Requires-Dist: typing-extensions>=4.7"


def relabel(source: Path, out_dir: Path) -> Path:
    data = source.read_bytes()
    if hashlib.sha256(data).hexdigest() != SOURCE_SHA256:
        sys.exit(f"{source} is not PyPI's xdsl-0.28.0-py3-none-any.whl (SHA-256 differs)")
    old_info, new_info = f"xdsl-{VERSION}.dist-info/", f"xdsl-{LOCAL}.dist-info/"
    entries: list[tuple[zipfile.ZipInfo, bytes]] = []
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        for info in wheel.infolist():
            content = wheel.read(info)
            if info.filename.startswith(old_info):
                info.filename = new_info + info.filename[len(old_info):]
                if info.filename.endswith("/METADATA"):
                    text = content.decode()
                    if f"Version: {VERSION}\n" not in text or PIN not in text:
                        sys.exit("unexpected METADATA: not the wheel this script was written for")
                    content = text.replace(f"Version: {VERSION}\n", f"Version: {LOCAL}\n", 1) \
                                  .replace(PIN, RELAXED).encode()
            entries.append((info, content))
    record = new_info + "RECORD"
    rows = []
    for info, content in entries:
        if info.filename != record:
            digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
            rows.append([info.filename, f"sha256={digest}", str(len(content))])
    rows.append([record, "", ""])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    entries = [(info, text.getvalue().encode() if info.filename == record else content) for info, content in entries]
    out = out_dir / f"xdsl-{LOCAL}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as wheel:
        for info, content in entries:
            wheel.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED)
    return out


if __name__ == "__main__":
    print(relabel(Path(sys.argv[1]), Path(__file__).resolve().parent))
