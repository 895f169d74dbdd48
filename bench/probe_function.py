"""A function that only notes when each CloudEvent arrived: the instrument of bench/events.py.

It reads the object name from the event's data, as the real functions do: the subject
header is percent-encoded on the wire, and functions-framework hands it over undecoded.
"""

import json
import os
import time

import functions_framework


@functions_framework.cloud_event
def probe(cloud_event) -> None:
    arrived = time.time()
    with open(os.environ["FEDPIPE_PROBE_LOG"], "a") as log:
        log.write(json.dumps({"name": cloud_event.data["name"], "t": arrived}) + "\n")
