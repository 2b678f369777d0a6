"""Security: no pickle loading anywhere in the repo, and a running app that listens on loopback only,
serves no file it was not given, ignores file paths smuggled into the chat, and shows text as text."""
import ast
import json
import urllib.error
import urllib.request
import uuid

import psutil
import pytest
from gradio_client import Client

from bench.load import server_process
from minigpt.serve.conversation import MODES
from tests.helpers import REPO

FILE_COMPONENTS = {"File", "Files", "UploadButton", "DownloadButton", "FileExplorer", "Image", "Audio", "Video",
                   "Gallery", "Model3D", "ImageEditor", "MultimodalTextbox"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
MORE = [0, 1, 0, 0, "", False, ""]  # /chat's More sampling inputs, off: min-p, the penalties, logit bias, JSON, schema


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def pickle_uses(source: str) -> list[str]:
    """Lines that import a pickle-based module or call a loader that unpickles."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in PICKLE_MODULES for n in names):
                found.append(f"{node.lineno}: imports {', '.join(names)}")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") and not is_true(keywords.get("weights_only")):
                found.append(f"{node.lineno}: {name} without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and is_true(keywords.get("allow_pickle")):
                found.append(f"{node.lineno}: {name} with allow_pickle=True")
            elif name.endswith(("torch.hub.load", "read_pickle")) or is_true(keywords.get("trust_remote_code")):
                found.append(f"{node.lineno}: {name}")
    return found


def test_the_scanner_finds_each_kind_of_pickle_loading():
    source = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\nx = torch.load('a.pt')\n"
              "y = torch.load('a.pt', weights_only=False)\nz = torch.load('a.pt', weights_only=True)\n"
              "w = np.load('a.npy', allow_pickle=True)\nm = AutoModel.from_pretrained('x', trust_remote_code=True)\n")
    assert pickle_uses(source) == ["1: imports pickle", "2: imports joblib", "4: torch.load without weights_only=True",
                                   "5: torch.load without weights_only=True", "7: np.load with allow_pickle=True",
                                   "8: AutoModel.from_pretrained"]


def test_no_python_file_in_the_repo_loads_pickles():
    files = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): uses for p in files if (uses := pickle_uses(p.read_text(encoding="utf-8")))}
    assert found == {}


def status_of(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_app_listens_on_loopback_only(app):
    sockets = [c for c in server_process(app.url).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert sockets and {c.laddr.ip for c in sockets} == {"127.0.0.1"}


@pytest.mark.parametrize("path", ["gradio_api/file=/etc/passwd", "gradio_api/file=app.py",
                                  "gradio_api/file=../../../../etc/passwd", "gradio_api/file=%2Fetc%2Fpasswd",
                                  "gradio_api/file={checkpoint}/model.safetensors", "file=/etc/passwd"])
@pytest.mark.slow
def test_no_file_outside_gradio_cache_is_served(app, path):
    assert status_of(app.url + path.format(checkpoint=app.checkpoint)) in (403, 404)


@pytest.mark.slow
def test_a_file_path_smuggled_into_the_history_is_never_read(app):
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd",
                                                                     "meta": {"_type": "gradio.FileData"}}},
                                            {"type": "text", "text": "What is in this file?"}]}]
    body = json.dumps({"data": [history, "Base GPT-2", 0, 0, 1, 8, "1", 1, *MORE]}).encode()  # ..., scale
    request = urllib.request.Request(app.url + "gradio_api/call/chat", body, {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{app.url}gradio_api/call/chat/{event}", timeout=60).read().decode()
    assert "root:" not in stream and "event: error" in stream  # refused; nothing of the file comes back
    assert "holds a part that is not text: the chat takes text only." in stream and "/etc/passwd" not in stream
    assert Client(app.url, verbose=False).predict(  # and the server keeps serving
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "Base GPT-2", 0, 0, 1, 4, "1",
        api_name="/chat")[0][-1]["role"] == "assistant"


@pytest.mark.slow
def test_the_api_offers_no_file_or_path_input(app):
    api = Client(app.url, verbose=False).view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/chat", "/stop", "/alternatives"} and not api["unnamed_endpoints"]
    parameters = [p for e in api["named_endpoints"].values() for p in e["parameters"]]
    assert not {p["component"] for p in parameters} & FILE_COMPONENTS
    mode = next(p for p in parameters if p["parameter_name"] == "mode")
    assert (mode["component"], mode["type"]["enum"]) == ("Radio", list(MODES))  # no adapter path to type in


@pytest.mark.slow
def test_the_chat_renders_text_not_html(app):
    config = json.loads(urllib.request.urlopen(app.url + "config", timeout=10).read())
    chat = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "chat")
    assert chat["props"]["render_markdown"] is False and chat["props"]["sanitize_html"] is True


@pytest.mark.slow
def test_uploads_beyond_the_export_size_are_refused(app):
    body = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 3 * 2**20 + b"\r\n--B--\r\n")
    request = urllib.request.Request(app.url + "gradio_api/upload", body,
                                     {"Content-Type": "multipart/form-data; boundary=B"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413  # Gradio's max_file_size: it stops reading at the limit


def call_event(app, api: str, data: list) -> str:
    """A named event through Gradio's HTTP API: its event stream, as text."""
    request = urllib.request.Request(app.url + f"gradio_api/call/{api}", json.dumps({"data": data}).encode(),
                                     {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    return urllib.request.urlopen(f"{app.url}gradio_api/call/{api}/{event}", timeout=120).read().decode()


def join_event(app, elem_id: str, trigger: str, data: list, event_data) -> dict:
    """Any event, private ones included, as the page sends it (queue/join): its last message."""
    config = json.loads(urllib.request.urlopen(app.url + "config", timeout=10).read())
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    fn_index = next(i for i, d in enumerate(config["dependencies"])
                    if any(ids.get(t[0]) == elem_id and t[1] == trigger for t in d["targets"]))
    session = uuid.uuid4().hex[:12]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data, "trigger_id": None}
    urllib.request.urlopen(urllib.request.Request(app.url + "gradio_api/queue/join", json.dumps(body).encode(),
                                                  {"Content-Type": "application/json"}), timeout=30).read()
    for line in urllib.request.urlopen(f"{app.url}gradio_api/queue/data?session_hash={session}", timeout=120):
        message = json.loads(line.decode()[5:]) if line.startswith(b"data:") else {}
        if message.get("msg") == "process_completed":
            return message


@pytest.mark.slow
def test_a_history_with_text_content_is_accepted_as_documented(app):
    stream = call_event(app, "chat", [[{"role": "user", "content": "hi"}], "Base GPT-2", 0, 0, 1, 4, "1", 1,
                                      *MORE])
    assert "event: complete" in stream and "pydantic" not in stream


@pytest.mark.slow
@pytest.mark.parametrize("api, data, message", [
    ("chat", [[{"role": "user", "content": "hi"}], "Base GPT-2", "abc", 0, 1, 4, "1", 1, *MORE],
     "Temperature must be a number, got 'abc'."),
    ("chat", [[{"role": "user", "content": "hi"}], "Base GPT-2", 0, 0, 1, [4], "1", 1, *MORE],
     "Max new tokens must be a number, got [4]."),
    ("alternatives", ["abc"], "Token position must be a number, got 'abc'."),
])
def test_a_slider_sent_text_gets_a_message(app, api, data, message):
    stream = call_event(app, api, data)
    assert "event: error" in stream and json.dumps(message) in stream and "preprocess" not in stream


@pytest.mark.slow
@pytest.mark.parametrize("request_text, note", [("abc", "three whole numbers"), ("1:2:3:4", "three whole numbers"),
                                                ("9:1:50", "no longer on screen"), ("", "three whole numbers")])
def test_a_crafted_branch_request_gets_a_note_not_a_python_error(app, request_text, note):
    """The page's script sends "key:position:token" when an alternative is clicked; anything else is a note
    beside the panel, and nothing on screen changes."""
    done = join_event(app, "branch_go", "click", [None, request_text], None)
    assert done["success"], done
    assert note in json.dumps(done["output"]["data"])
    assert "Traceback" not in app.log.read_text()


def upload(app, files: list[bytes], client: str) -> tuple[int, str]:
    """POST files to Gradio's upload route as one client (X-Forwarded-For, as behind a Space's proxy)."""
    body = b"".join(b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"c%d.json\"\r\n"
                    b"Content-Type: application/json\r\n\r\n" % i + data + b"\r\n" for i, data in enumerate(files))
    request = urllib.request.Request(app.url + "gradio_api/upload", body + b"--B--\r\n",
                                     {"Content-Type": "multipart/form-data; boundary=B", "X-Forwarded-For": client})
    try:
        response = urllib.request.urlopen(request, timeout=60)
        return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_uploads_are_bounded_per_request_and_per_client(app):
    file = b"{" + b" " * (19 * 2**20 // 10) + b"}"  # 1.9 MiB: under Gradio's 2 MB per file
    status, text = upload(app, [file] * 3, "203.0.113.7")
    assert (status, text) == (413, "An upload is at most 2 MiB per request.")  # three at once: refused unread
    accepted = [upload(app, [file], "203.0.113.7") for _ in range(8)]
    assert [status for status, _ in accepted] == [200] * 8 and all(".json" in text for _, text in accepted)
    status, text = upload(app, [file], "203.0.113.7")  # 16 MiB is this client's share of the upload space
    assert status == 429 and text.startswith("Too many uploads from you: at most 16 MiB per 2 hours.")
    assert upload(app, [b"{}"], "203.0.113.8")[0] == 200  # another client is not held up


@pytest.mark.slow
def test_an_event_that_changes_nothing_changes_nothing(app):
    """A load with no file: the handler changes no output (an empty dict, which Gradio alone took for one value)."""
    done = join_event(app, "load_file", "upload", [None, None], None)
    assert done["success"], done
