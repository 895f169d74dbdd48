"""A function that only notes when each CloudEvent arrived: the instrument of bench/events.py."""

import json
import os
import time

import functions_framework


@functions_framework.cloud_event
def probe(cloud_event) -> None:
    arrived = time.time()
    with open(os.environ["FEDPIPE_PROBE_LOG"], "a") as log:
        log.write(json.dumps({"subject": cloud_event["subject"], "t": arrived}) + "\n")
