"""lm-evaluation-harness as a client nobody here wrote: its `local-completions` model with default settings
(the remote tokenizer found through /tokenizer_info, token-id prompts, batches of 4 prompts per request)
scores a small local task exactly as its `hf` model scores the same checkpoint in transformers."""
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

TASK = """task: minigpt_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
        {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
        {"question": "Cats like to", "choices": [" sleep", " swim", " fly", " sing"], "answer": 0},
        {"question": "Water is", "choices": [" wet", " dry"], "answer": 0},
        {"question": "The opposite of hot is", "choices": [" cold", " warm", " up"], "answer": 0}]


def requests_answered(app) -> dict[str, float]:
    """Requests answered with 200, by route, from the server's own /metrics (a client that left an earlier
    test may be counted late, as a 499)."""
    text = httpx.get(app.url + "metrics", timeout=30).text
    return {s.labels["route"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "minigpt_api_requests_total" and s.labels["status"] == "200"}


def loglikelihoods(results) -> list[float]:
    return [resp[0][0] for sample in results["samples"]["minigpt_local"] for resp in sample["resps"]]


def test_local_completions_scores_as_lm_evals_hf_model(app, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path))
    before = requests_answered(app)
    served = simple_evaluate(model="local-completions", tasks=["minigpt_local"], task_manager=tasks, log_samples=True,
                             model_args=f"model=minigpt-base,base_url={app.url}v1/completions,batch_size=4")
    local = simple_evaluate(model="hf", tasks=["minigpt_local"], task_manager=tasks, log_samples=True,
                            model_args=f"pretrained={app.checkpoint}", batch_size=4, device="cpu")
    after = requests_answered(app)
    scored = sum(len(d["choices"]) for d in DOCS)
    assert len(loglikelihoods(served)) == scored
    assert after["/tokenize"] > before.get("/tokenize", 0)  # lm-eval's default found the remote tokenizer
    assert after["/v1/completions"] - before.get("/v1/completions", 0) == -(-scored // 4)  # 4 prompts a request
    assert loglikelihoods(served) == pytest.approx(loglikelihoods(local), abs=1e-4)
    assert served["results"]["minigpt_local"]["acc,none"] == local["results"]["minigpt_local"]["acc,none"]
