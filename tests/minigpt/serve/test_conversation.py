"""The chat app's core without any UI: prompts for both modes, context fitting, settings validation."""
import pytest

from minigpt.prompts import DIALOGUE_HEADER, Exchange
from minigpt.request import Mode
from minigpt.sampling import SamplingParams
from minigpt.serve.conversation import (
    BASE,
    MoreSampling,
    MAX_HISTORY_CHARS,
    MAX_HISTORY_MESSAGES,
    MAX_TEMPERATURE,
    TUNED,
    ChatInputError,
    as_chat_text,
    build_prompt,
    check_history,
    context_note,
    message_text,
    read_choice,
    read_request,
    split_history,
    without_last_reply,
)


def render_prompt(mode, exchanges, message):
    from minigpt.prompts import render_prompt as render
    return render(mode.framing if isinstance(mode, Mode) else mode, exchanges, message)

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def user(text):  # as Gradio 6 hands history to a handler
    return {"role": "user", "content": [{"type": "text", "text": text}], "metadata": None, "options": None}


def bot(text):  # as a handler returns it
    return {"role": "assistant", "content": text}


def test_message_text_reads_both_content_shapes():
    assert message_text(user("hi there")) == "hi there"
    assert message_text(bot("plain")) == "plain"
    assert message_text({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "file"},
                                                     {"type": "text", "text": "b"}]}) == "a b"


def test_chat_text_is_escaped_for_display_and_read_back_exactly():
    for text in ["<img src=x onerror=alert(1)>", "a &lt; b & c", "<script>x</script> \"q\" 'r'", "plain"]:
        shown = as_chat_text(text)
        assert "<" not in shown and message_text(bot(shown)) == text and message_text(user(shown)) == text


def test_split_history_pairs_turns_and_returns_the_new_message():
    history = [user("one"), bot("uno"), user("two"), user("three")]
    assert split_history(history) == ([Exchange("one", "uno"), Exchange("two", "")], "three")


def test_without_last_reply_keeps_everything_up_to_the_last_user_message():
    assert without_last_reply([user("q"), bot("a"), user("r"), bot("b"), bot("c")]) == [user("q"), bot("a"), user("r")]
    assert without_last_reply([user("q")]) == [user("q")] and without_last_reply([]) == []


@pytest.mark.parametrize("history", [[], [user("q"), bot("a")]])
def test_split_history_refuses_when_there_is_nothing_to_answer(history):
    with pytest.raises(ChatInputError, match="no user message"):
        split_history(history)


def test_base_prompt_is_a_plain_dialogue_transcript():
    text = render_prompt(BASE, [Exchange("Hi!", "Hello. How can I help?")], "Name a colour.")
    assert text == (DIALOGUE_HEADER + "User: Hi!\nAssistant: Hello. How can I help?\n"
                    "User: Name a colour.\nAssistant:")


def test_tuned_prompt_of_a_first_message_is_exactly_the_alpaca_template():
    assert render_prompt(TUNED, [], "Name a colour.") == ALPACA_NO_INPUT.format(instruction="Name a colour.")


def test_tuned_prompt_puts_earlier_exchanges_in_the_input():
    text = render_prompt(TUNED, [Exchange("Name a colour.", "Blue."), Exchange("Another?", "Red.")], "In French?")
    assert text == ALPACA_WITH_INPUT.format(
        instruction="In French?", input="User: Name a colour.\nAssistant: Blue.\nUser: Another?\nAssistant: Red.")


def test_unknown_mode_is_refused():
    with pytest.raises(ChatInputError, match="Unknown mode"):
        build_prompt("GPT-5", [{"role": "user", "content": "hi"}], None, 100)


def test_prompt_ids_are_the_whole_text_encoded_with_special_tokens_as_text(tiny_model):
    _, tokenizer, _ = tiny_model
    prompt = build_prompt(BASE, [user("what does <|endoftext|> mean?")], tokenizer, budget=1000)
    assert prompt.ids == tokenizer.encode_ordinary(prompt.text)
    assert 50256 not in prompt.ids and "<|endoftext|>" in tokenizer.decode(prompt.ids)
    assert prompt.dropped == 0 and prompt.stop == ("\nUser:", "\nAssistant:")


@pytest.mark.parametrize("mode", [BASE, TUNED])
def test_truncation_drops_the_fewest_oldest_exchanges_and_keeps_header_and_message(tiny_model, mode):
    _, tokenizer, _ = tiny_model
    history = []
    for i in range(12):
        history += [user(f"question number {i} about the weather"), bot(f"answer {i}: it is sunny today")]
    history.append(user("and tomorrow?"))
    budget = 120
    prompt = build_prompt(mode, history, tokenizer, budget)
    exchanges, message = split_history(history)

    assert 0 < prompt.dropped < 12 and len(prompt.ids) <= budget
    kept = render_prompt(mode, exchanges[prompt.dropped:], message)
    one_more = render_prompt(mode, exchanges[prompt.dropped - 1:], message)
    assert prompt.text == kept and len(tokenizer.encode_ordinary(one_more)) > budget  # the fewest dropped
    assert prompt.text.startswith(render_prompt(mode, [], message)[:40])  # the header is kept
    assert "and tomorrow?" in prompt.text and "question number 0 " not in prompt.text
    assert f"question number {prompt.dropped} " in prompt.text  # the oldest kept exchange is whole


class CountingTokenizer:
    """The real tokenizer, counting the calls and the characters it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def encode_ordinary(self, text):
        self.calls += 1
        self.chars += len(text)
        return self.tokenizer.encode_ordinary(text)


@pytest.mark.parametrize("mode", [BASE, TUNED])
def test_the_largest_allowed_history_is_fitted_with_work_bounded_by_the_window(tiny_model, mode):
    tokenizer = CountingTokenizer(tiny_model[1])
    text = "word " * (MAX_HISTORY_CHARS // MAX_HISTORY_MESSAGES // 5 - 1)  # each message near its share of the bound
    history = [user(text) if i % 2 == 0 else bot(text) for i in range(MAX_HISTORY_MESSAGES - 1)]
    check_history(history)  # allowed: the most messages and nearly the most characters
    assert sum(len(message_text(m)) for m in history) > 0.9 * MAX_HISTORY_CHARS

    prompt = build_prompt(mode, history, tokenizer, budget=896)
    kept = len(split_history(history)[0]) - prompt.dropped
    assert len(prompt.ids) <= 896 and prompt.dropped > 400
    # each kept exchange is measured once, plus the header, the exchange that did not fit and the final text
    assert tokenizer.calls <= kept + 4
    assert tokenizer.chars <= 4 * len(prompt.text)  # a few windows' worth, not the 1 MB history


@pytest.mark.parametrize("history, message", [
    ([user("hi"), bot("hello")] * (MAX_HISTORY_MESSAGES // 2) + [user("and?")], "at most 1000 are accepted"),
    ([user("x" * (MAX_HISTORY_CHARS // 2)), bot("y" * (MAX_HISTORY_CHARS // 2)), user("z")],
     "holds 1,000,001 characters; at most 1,000,000"),
])
def test_an_oversized_history_is_refused_before_any_tokenizing(tiny_model, history, message):
    tokenizer = CountingTokenizer(tiny_model[1])
    with pytest.raises(ChatInputError, match=message):
        build_prompt(BASE, history, tokenizer, budget=896)
    assert tokenizer.calls == 0


@pytest.mark.parametrize("history, message", [
    ({"role": "user", "content": "hi"}, "must be a list of messages"),
    (["hi"], "Message 1 of the chat history must be an object with a role and a content"),
    ([{"role": "user"}], "Message 1 .* must be an object with a role and a content"),
    ([user("a"), {"role": "tool", "content": "b"}], "Message 2 .* unknown role: use 'system', 'user' or 'assistant'"),
    ([{"role": "user", "content": 5}], "content of message 1 must be text or a list of text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "Message 1 .* part that is not text"),
    ([{"role": "user", "content": [{"type": "file", "file": {"path": "/etc/passwd"}}]}], "part that is not text"),
])
def test_a_history_of_the_wrong_shape_gets_one_line_that_echoes_nothing(history, message):
    with pytest.raises(ChatInputError, match=message) as refused:
        check_history(history)
    assert "\n" not in str(refused.value) and "/etc/passwd" not in str(refused.value)


def test_gradios_own_message_shape_and_plain_text_content_are_accepted():
    check_history([{"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None, "options": None},
                   {"role": "assistant", "content": "hello"}])


@pytest.mark.parametrize("value, message", [("2", None), (None, "must be a number, got None"),
                                            ("x" * 500, r"must be a number, got 'x{12}\.\.\.x{13}'\.$"),
                                            (1.5, "must be a whole number"), (9, "must be between -1 and 3, got 9")])
def test_a_choice_must_be_one_of_the_choices(value, message):
    if message is None:
        assert read_choice("Head", value, range(-1, 4)) == 2
    else:
        with pytest.raises(ChatInputError, match=f"Head {message}"):
            read_choice("Head", value, range(-1, 4))


def test_a_message_too_long_for_the_window_is_refused_with_the_numbers(tiny_model):
    _, tokenizer, _ = tiny_model
    with pytest.raises(ChatInputError, match=r"too long: .* takes \d+ tokens, but only 30 fit"):
        build_prompt(BASE, [user("word " * 40)], tokenizer, budget=30)


def test_context_note_says_what_was_dropped(tiny_model):
    _, tokenizer, _ = tiny_model
    history = [user("a " * 20), bot("b " * 20), user("c " * 20), bot("d " * 20), user("e")]
    prompt = build_prompt(BASE, history, tokenizer, budget=40)
    assert prompt.dropped == 2
    assert context_note(prompt, 1024) == ("The conversation outgrew the 1024-token window: the oldest 2 exchanges "
                                          "were left out of the prompt (the header is kept).")
    assert context_note(build_prompt(BASE, [user("e")], tokenizer, 40), 1024) == ""


def test_settings_accept_slider_values_and_a_blank_seed():
    settings, notices = read_request(BASE, 0.7, 40, 0.9, 100, None, 1.0, context=1024)
    assert (settings.params.temperature, settings.params.top_k, settings.params.top_p) == (0.7, 40, 0.9)
    assert (settings.max_new_tokens, settings.seed, notices) == (100, None, [])
    assert read_request(BASE, 0, 0, 1.0, 5, "  ", 1.0, 1024)[0].params.greedy
    assert read_request(BASE, 1, 0, 1, 5, "42", 1.0, 1024)[0].seed == 42
    assert read_request(BASE, 1, 50.0, 1, 5.0, 7.0, 1.0, 1024)[0] == read_request(BASE, 1, 50, 1, 5, 7, 1.0, 1024)[0]


def test_settings_clamp_what_makes_sense_and_say_so():
    settings, notices = read_request(BASE, 5.0, 0, 1.0, 5000, None, 1.0, context=1024)
    assert settings.params.temperature == MAX_TEMPERATURE and settings.max_new_tokens == 512
    assert notices == ["Temperature 5 is above 2; used 2.", "Max new tokens 5000 is above 512; used 512."]
    assert read_request(BASE, 1, 0, 1, 100, None, 1.0, context=128)[0].max_new_tokens == 64  # half a small window


@pytest.mark.parametrize("args, message", [
    ((-1, 0, 1, 10, None), "Temperature must be a finite number >= 0"),
    (("hot", 0, 1, 10, None), "Temperature must be a number, got 'hot'"),
    ((float("nan"), 0, 1, 10, None), "Temperature must be a finite number"),
    ((1, -3, 1, 10, None), "Top-k must be a whole number >= 0"),
    ((1, 2.5, 1, 10, None), "Top-k must be a whole number, got 2.5"),
    ((1, 0, 0, 10, None), r"Top-p must be in \(0, 1\]"),
    ((1, 0, 1.5, 10, None), r"Top-p must be in \(0, 1\]"),
    ((1, 0, 1, 0, None), "Max new tokens must be at least 1, got 0"),
    ((1, 0, 1, 10, 1.5), "Seed must be a whole number, got 1.5"),
    ((1, 0, 1, 10, -1), "Seed must be between 0 and 18446744073709551615"),
    ((1, 0, 1, 10, str(2**64)), "Seed must be between 0 and 18446744073709551615"),
    ((1, 0, 1, 10, "abc"), "Seed must be a number, got 'abc'"),
])
def test_settings_refuse_nonsense_with_a_message_for_the_user(args, message):
    with pytest.raises(ChatInputError, match=message):
        read_request(BASE, *args, 1.0, context=1024)


@pytest.mark.parametrize("mode, expected", [
    (BASE, "Talk like a pirate.\n\nUser: Hi\nAssistant: Arr.\nUser: Bye\nAssistant:"),
    (TUNED, ALPACA_WITH_INPUT.format(instruction="Bye", input="Talk like a pirate.\n\nUser: Hi\nAssistant: Arr.")),
])
def test_system_messages_replace_the_dialogue_header_and_lead_the_alpaca_input(tiny_model, mode, expected):
    _, tokenizer, _ = tiny_model
    history = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Bye"}]
    assert build_prompt(mode, history, tokenizer, 1000).text == expected


def test_a_64_bit_seed_is_read_exactly():
    assert read_request(BASE, 1, 0, 1, 10, str(2**64 - 1), 1.0, context=1024)[0].seed == 2**64 - 1


@pytest.mark.parametrize("more, message", [
    (MoreSampling(presence_penalty=3), "Presence penalty must be from -2 to 2"),
    (MoreSampling(repetition_penalty=0), "Repetition penalty must be above 0"),
    (MoreSampling(min_p="x"), "Min-p must be a number"),
    (MoreSampling(logit_bias="{50256: -100}"), "Logit bias must be a JSON object"),
    (MoreSampling(logit_bias='{"50257": 1}'), "Logit bias: keys must be token ids from 0 to 50256"),
    (MoreSampling(logit_bias='{"1": 200}'), "Logit bias: values must be numbers from -100 to 100"),
    (MoreSampling(as_json=True, schema=" "), "Answer as JSON needs a schema"),
])
def test_more_sampling_refuses_nonsense_in_the_controls_words(more, message):
    with pytest.raises(ChatInputError, match=message):
        read_request(BASE, 1, 0, 1, 10, None, 1.0, context=1024, more=more)


def test_more_sampling_becomes_the_samplers_params():
    more = MoreSampling(0.05, 1.2, 0.5, -0.5, '{"50256": -100}', True, '{"type": "object"}')
    params = read_request(BASE, 1, 0, 1, 10, None, 1.0, context=1024, more=more)[0].params
    assert (params.min_p, params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        0.05, 1.2, 0.5, -0.5)
    assert params.logit_bias == ((50256, -100.0),) and params.json_schema == '{"type": "object"}'
    assert read_request(BASE, 1, 0, 1, 10, None, 1.0, context=1024, more=MoreSampling(
        schema="ignored"))[0].params == SamplingParams(1, 0, 1)
