"""A pod process holding one keep-alive connection to the metadata address.

Each line read on stdin sends one request on that same connection and prints
one line: the HTTP status, or the error that ended the connection.
"""

import http.client
import sys

conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
conn.connect()
print("connected", flush=True)
for line in sys.stdin:
    path = line.strip() or "/metadata/instance?api-version=2021-02-01"
    try:
        conn.request("GET", path, headers={"Metadata": "true"})
        response = conn.getresponse()
        response.read()
        print(response.status, flush=True)
    except OSError as exc:
        print(f"error {type(exc).__name__}", flush=True)
        break
