#!/usr/bin/env python3
"""Copies etcd's own .proto files here, minus what only the grpc-gateway needs.

    etcd/proto/vendor.py /path/to/etcd-checkout    # at tag v3.5.33

The files are etcd's (Apache-2.0), unchanged but for options that only other code
generators read: the `google.api.http` method options (grpc-gateway) and gogoproto's
file and field options (Go code generation), and their imports. Messages, services
and field numbers are kept, so what build.rs compiles with protox is etcd's wire
contract. v3.5 is the API the Debian etcd-server 3.4 and every later server speak.
"""

import pathlib
import re
import sys

FILES = {
    "api/etcdserverpb/rpc.proto": "etcd/api/etcdserverpb/rpc.proto",
    "api/mvccpb/kv.proto": "etcd/api/mvccpb/kv.proto",
    "api/authpb/auth.proto": "etcd/api/authpb/auth.proto",
    "server/etcdserver/api/v3election/v3electionpb/v3election.proto": "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
}
DROP_IMPORTS = (
    "google/api/annotations.proto",
    "protoc-gen-openapiv2/options/annotations.proto",
    "gogoproto/gogo.proto",
)


def strip_option_blocks(text: str, pattern: str) -> str:
    """Removes `option (NAME) = { ... };` blocks whose NAME matches pattern."""
    out, i = [], 0
    rx = re.compile(r"[ \t]*option \((" + pattern + r")\) = \{")
    while True:
        m = rx.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j = 0, m.end() - 1
        while True:
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        j += 1
        if text[j:j + 1] == ";":
            j += 1
        if text[j:j + 1] == "\n":
            j += 1
        i = j


def main() -> None:
    src = pathlib.Path(sys.argv[1])
    here = pathlib.Path(__file__).resolve().parent
    for upstream, local in FILES.items():
        text = (src / upstream).read_text()
        text = strip_option_blocks(text, r"google\.api\.http|grpc\.gateway\.[a-z0-9_.]+")
        text = "".join(l for l in text.splitlines(True) if not any(f'import "{d}"' in l for d in DROP_IMPORTS))
        text = "".join(l for l in text.splitlines(True) if not l.lstrip().startswith("option (gogoproto."))
        text = re.sub(r"\s*\[\s*\(gogoproto\.[^\]]*\]", "", text)
        # A method whose only option was removed keeps an empty body: `rpc X(..) returns (..) {}`.
        text = re.sub(r"\{\s*\n\s*\}", "{}", text)
        out = here / local
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"{upstream} -> {out.relative_to(here)}")


if __name__ == "__main__":
    main()
