import gc
import logging

from app import create_app

app = create_app()

# What exists now (the app, its libraries, their modules: about 75,000 objects) lives as long as
# the worker. Frozen, the garbage collector's full collections stop scanning it, and one of them
# pauses every stream in the worker for about 1 ms instead of about 30 ms. Garbage is collected
# first: a frozen cycle would never be freed. (Frozen objects are also left out of
# gc.get_objects(), which debugging tools such as gevent's GreenletTree walk.)
gc.collect()
gc.freeze()

# A young collection scans every object made since the last one that is still alive: on a busy
# worker that is every open stream's state (about 80 objects a stream), not the 700 objects the
# default threshold suggests, because CPython counts old objects freed against the young count.
# Measured at 200 req/s of 20-token streams: by default 3-7 young collections a second of about
# 1.2 ms each, plus an older one of about 3 ms every few seconds; at 10,000, one collection every
# 6 s of about 5 ms (longest 8.4 ms against 6.5 ms), a sixth of the time paused or less. What
# piles up in between is small: Werkzeug's URL-matcher closure (8 objects a request); a stream,
# failed or not, is freed without the collector (tests/test_garbage.py).
gc.set_threshold(10_000)

# Under gevent every connection is served by a new greenlet, and a log record's thread name made
# the first line logged in it create a threading._DummyThread: about 25,000 instructions per
# connection (GET /healthz over a new connection each time: 1.52 M -> 1.49 M, counted with
# callgrind). No log line here shows the thread or the process name, only the process id.
logging.logThreads = False
logging.logMultiprocessing = False
