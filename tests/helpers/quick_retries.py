"""Run a command module as `python -m` would, with huggingface_hub's waits between retries cut a hundredfold:

    python -m tests.helpers.quick_retries minigpt.generate --model someone/tiny-gpt2 ...

The Hub tests check what our commands say and keep once huggingface_hub has used up its retries; how long
it waits between them (1, 2, 4, 8, 8 s) is its own policy, and waiting it out cost the suite a minute.
The retries themselves, their number and the request timeouts are unchanged."""
import runpy
import sys
import time
from types import SimpleNamespace

import huggingface_hub.file_download
import huggingface_hub.utils._http

quick_time = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
quick_time.sleep = lambda seconds: time.sleep(seconds / 100)
huggingface_hub.utils._http.time = quick_time  # http_backoff's waits
huggingface_hub.file_download.time = quick_time  # http_get's wait before resuming a dropped download

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
