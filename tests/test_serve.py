"""serve.py end to end on the packaged SmolLM2: the official openai client, and the page in a headless Chromium."""
import shutil

import pytest

from serving import launch

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py on the packaged model, on a free local port, as a user starts it."""
    from utils import default_model_checkpoint

    with open(tmp_path_factory.mktemp("serve") / "serve.log", "w") as log:
        process, url = launch(["--model_checkpoint", default_model_checkpoint(), "--device", "cpu",
                               "--max_length", "16", "--served_model_name", "smollm2"], log)
        yield url
        process.terminate()
        process.wait(30)


def test_the_openai_client_gets_replies_streamed_and_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="not-needed")
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    messages = [{"role": "system", "content": "i love cats.\ni am a nurse."},
                {"role": "user", "content": "hi! what do you do for a living?"}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
    content = reply.choices[0].message.content
    assert content.strip() and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 13 and reply.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == content and len(pieces) > 3  # the same greedy reply, token by token
    sampled = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=1.0,
                                             seed=3, n=2)
    assert len(sampled.choices) == 2 and all(c.message.content.strip() for c in sampled.choices)
    scored = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert scored.choices[0].message.content == content  # logprobs change nothing of the reply
    assert b"".join(bytes(t.bytes) for t in tokens).decode().strip() == content  # byte-level tokens, whole
    assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in tokens)  # greedy: the likeliest
    penalised = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                               frequency_penalty=2.0, presence_penalty=2.0)
    repeats = len({bytes(t.bytes) for t in tokens}) < len(tokens)
    assert (penalised.choices[0].message.content != content) == repeats  # penalties lower only tokens said before


def chromium_driver(tmp_path):
    """Debian's Chromium through Selenium with the system chromedriver (nothing downloaded), or a skip saying why."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: install Debian's chromium and chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# Records every text the reply bubble shows, to tell a streamed reply from one that appears at once.
WATCH_REPLIES = """
window.shown = [];
new MutationObserver(() => {
  const bubble = document.querySelector('#messages .assistant, #messages .error');
  if (bubble) window.shown.push(bubble.textContent);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def test_the_page_shows_a_streamed_reply_to_a_typed_message(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver(tmp_path)
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: "smollm2" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "persona").send_keys("i love cats.\ni am a nurse.")
        driver.execute_script(WATCH_REPLIES)
        driver.execute_script(RECORD_REQUESTS)
        driver.find_element(By.ID, "input").send_keys("hi! what do you do for a living?")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#messages [data-done="true"]'))
        user, reply = driver.find_elements(By.CSS_SELECTOR, "#messages .msg")
        assert user.text == "hi! what do you do for a living?"
        assert "assistant" in reply.get_attribute("class") and reply.text.strip()
        shown = [t for t in driver.execute_script("return window.shown") if t]
        assert len(set(shown)) > 2 and all(reply.text.startswith(t.strip()) for t in shown)  # grew piece by piece
        assert driver.execute_script("return window.sent") == [[  # the persona box is the system message
            {"role": "system", "content": "i love cats.\ni am a nurse."},
            {"role": "user", "content": "hi! what do you do for a living?"}]]
        driver.save_screenshot(str(tmp_path / "chat.png"))
        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    finally:
        driver.quit()


# Records the messages of every chat request the page sends (the real fetch still runs).
RECORD_REQUESTS = """
window.sent = [];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.sent.push(JSON.parse(options.body).messages);
  return realFetch(url, options);
};
"""

# The server answers with an empty reply (it can: max_tokens 1 on a token that decodes to nothing), once.
ONE_EMPTY_REPLY = """
const passOn = window.fetch;
let answered = false;
window.fetch = (url, options) => {
  if (answered || !options || !options.body) return passOn(url, options);
  answered = true;
  const body = 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\\n\\ndata: [DONE]\\n\\n';
  return Promise.resolve(new Response(body, {headers: {"Content-Type": "text/event-stream"}}));
};
"""


def test_reset_drops_a_streaming_reply_and_an_empty_reply_does_not_break_the_chat(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def say(text):
        driver.find_element(By.ID, "input").send_keys(text)
        driver.find_element(By.ID, "send").click()

    def answered(n):
        WebDriverWait(driver, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#messages [data-done="true"]'))
                                         == n and not d.find_element(By.ID, "send").get_attribute("disabled"))

    driver = chromium_driver(tmp_path)
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: "smollm2" in d.find_element(By.ID, "model").text)
        driver.execute_script(RECORD_REQUESTS)
        say("my cat is called luna. tell me a long story about her")
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#messages .assistant").text.strip())
        streaming = driver.execute_script("""
            const reply = document.querySelector('#messages .assistant');
            const streaming = reply.dataset.done === 'false';
            document.getElementById('reset').click();
            return streaming;""")
        assert streaming  # reset while the reply was still coming
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled"))
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
        say("hello")
        answered(1)
        assert driver.execute_script("return window.sent")[-1] == [{"role": "user", "content": "hello"}]
        first = driver.find_element(By.CSS_SELECTOR, "#messages .assistant").text

        driver.execute_script(ONE_EMPTY_REPLY)
        say("are you there?")
        answered(2)
        error = driver.find_elements(By.CSS_SELECTOR, "#messages .msg")[-1]
        assert "error" in error.get_attribute("class") and "no reply" in error.text
        say("ok, how are you?")
        answered(3)
        assert driver.execute_script("return window.sent")[-1] == [
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "ok, how are you?"}]  # the unanswered turn left the history
        assert "assistant" in driver.find_elements(By.CSS_SELECTOR, "#messages .msg")[-1].get_attribute("class")
    finally:
        driver.quit()
