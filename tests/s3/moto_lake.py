#!/usr/bin/env python3
"""A real S3-compatible server (moto, from PyPI's moto[server]) on 127.0.0.1 for threatlake's tests.

Starts moto's server on a free loopback port, enforces request signing (an IAM user with an S3
policy is created, so wrong credentials are refused like on AWS), creates the buckets asked for and
prints one JSON line: {"endpoint", "access_key_id", "secret_access_key", "port"}.

Then it reads commands, one per line, from stdin and answers "ok" (or "error: ...") on stdout:
  die-after-puts N   after N more PUT requests the server goes away (listener closed: connections
                     are refused), as if the process had died mid-ingest; the stored objects stay
                     in memory so a test can check the lake afterwards
  revive             listen again on the same port with the same data
  puts               print the number of PUT requests served so far
It exits when stdin closes (the test process ended) or after --max-seconds, whichever is first.
"""

import argparse
import json
import logging
import os
import sys
import threading

ap = argparse.ArgumentParser()
ap.add_argument("--bucket", action="append", default=[])
ap.add_argument("--max-seconds", type=float, default=1800)
args = ap.parse_args()

# Three unauthenticated IAM calls create the test user; everything after must be signed by it.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

import boto3  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    create_backend_app,
)
from werkzeug.serving import make_server  # noqa: E402

from moto.core.responses import BaseResponse  # noqa: E402

# moto checks signatures against the URL as werkzeug re-quotes it, which differs from what clients
# signed when a path or query holds percent-escapes (`domain%3Dics`, `prefix=a%2Fb`); check them
# against the URL exactly as sent instead.
_setup_class = BaseResponse.setup_class


def _setup_class_raw_uri(self, request, full_url, headers, use_raw_body=False):
    _setup_class(self, request, full_url, headers, use_raw_body)
    raw = getattr(request, "environ", {}).get("RAW_URI")
    if raw:
        self.uri = f"{self.parsed_url.scheme}://{self.parsed_url.netloc}{raw}"


BaseResponse.setup_class = _setup_class_raw_uri

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
app = DomainDispatcherApplication(create_backend_app)
state = {"puts": 0, "die_after": None, "server": None, "port": 0}
lock = threading.Lock()


def go_down():
    srv = state["server"]
    srv.shutdown()
    srv.server_close()


def wsgi(environ, start_response):
    if environ.get("REQUEST_METHOD") == "PUT":
        with lock:
            state["puts"] += 1
            dying = state["die_after"] is not None and state["puts"] > state["die_after"]
            if dying:
                state["die_after"] = None
        if dying:
            threading.Thread(target=go_down, daemon=True).start()
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"server going away"]
    return app(environ, start_response)


def serve(port):
    srv = make_server("127.0.0.1", port, wsgi, threaded=True)
    state["server"] = srv
    state["port"] = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()


serve(0)
endpoint = f"http://127.0.0.1:{state['port']}"
boot = dict(endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **boot)
iam.create_user(UserName="threatlake")
iam.put_user_policy(
    UserName="threatlake",
    PolicyName="lake",
    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}),
)
key = iam.create_access_key(UserName="threatlake")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
for b in args.bucket:
    s3.create_bucket(Bucket=b)

print(json.dumps({"endpoint": endpoint, "port": state["port"], "access_key_id": key["AccessKeyId"],
                  "secret_access_key": key["SecretAccessKey"]}), flush=True)

timer = threading.Timer(args.max_seconds, lambda: os._exit(0))
timer.daemon = True
timer.start()

for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[:1] == ["die-after-puts"]:
            with lock:
                state["die_after"] = state["puts"] + int(cmd[1])
        elif cmd == ["revive"]:
            serve(state["port"])
        elif cmd == ["puts"]:
            print(state["puts"], flush=True)
            continue
        else:
            raise ValueError(f"unknown command {line.strip()!r}")
        print("ok", flush=True)
    except Exception as e:  # report, keep serving
        print(f"error: {e}", flush=True)
os._exit(0)
