"""Chat in the terminal with a trained run and a persona.

    python interact.py                                   # the newest run under runs/, a persona from the data
    python interact.py --model_checkpoint runs/x --personality "i love cats." --personality "i am a nurse."
    printf 'hi!\\nhow are you?\\n' | python interact.py --no_sample   # scripted: one reply per input line

Type /reset for a new conversation, /persona to see the persona; Ctrl-D or Ctrl-C ends. Replies go to stdout,
everything else to stderr.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load (seconds): exit 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import logging
import os
import random
import re
from argparse import ArgumentParser

import torch

from checkpointing import read_training_args
from classifier import DataError
from decoding import DecodingConfig, add_decoding_args, check_decoding_args, generate, reply_text
from dialogs import DialogFormatError, read_personas
from layouts import InputFormatError
from modeling import add_run_args, load_tokenizer_and_model, model_max_length
from rankers import (Rankers, add_rerank_args, check_rerank_args, load_ranker_models, mc_rerank_error,
                     rerank_configs)
from utils import DATASET_SHORT_NAMES, checkpoint_or_newest_run, resolve_dataset_path, seed_type, set_seed

COMMANDS = "/reset starts over, /persona shows the persona, Ctrl-D ends"

logger = logging.getLogger(__file__)


def get_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_path", type=str, default="",
                        help="Dialog data to draw a persona from (default: the run's training data, else the "
                             "packaged chit-chat corpus, which has no personas)")
    parser.add_argument("--dataset_cache", type=str, default="./dataset_cache",
                        help="Where downloaded data is kept (default: ./dataset_cache)")
    parser.add_argument("--model", type=str, default="",
                        help="Model type to expect (openai-gpt, gpt2, llama, ...): an error if the checkpoint is another")
    add_run_args(parser)
    parser.add_argument("--personality", action="append", default=[],
                        help="A persona sentence; repeat for several. With it no dataset is read")
    parser.add_argument("--personality_file", type=str, default="", help="Persona sentences, one per line")
    parser.add_argument("--max_history", type=int, default=2, help="Previous exchanges kept in history (default: 2)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    add_decoding_args(parser)
    add_rerank_args(parser)
    parser.add_argument("--seed", type=seed_type, default=0, help="Seed of the persona draw and of sampling (default: 0)")
    args = parser.parse_args(argv)
    check_decoding_args(parser, args)
    check_rerank_args(parser, args)
    return args


def choose_persona(args, checkpoint):
    """Persona sentences from the flags, else one drawn at random from the data (never tokenizing all of it).

    The data: --dataset_path, else the run's own training data where it is still there, else the packaged corpus.
    """
    if args.personality:
        return args.personality
    if args.personality_file:
        try:
            with open(args.personality_file, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise FileNotFoundError(f"--personality_file {args.personality_file}: {e.strerror}") from None
    path = args.dataset_path
    trained_on = read_training_args(checkpoint).get("dataset_path") or ""
    if not path and trained_on:
        if os.path.exists(trained_on) or "://" in trained_on or trained_on in DATASET_SHORT_NAMES:
            path = trained_on
        else:
            logger.warning("The run's data %s is not here: drawing a persona from the packaged corpus", trained_on)
    personas = read_personas(resolve_dataset_path(path, args.dataset_cache))
    return random.Random(args.seed).choice(personas) if personas else []


def user_lines(prompt):
    """User messages: prompted in a terminal, one per line when piped; ends at EOF.

    In a terminal (stdin and stdout both), input() reads with GNU readline: arrow keys move along the line and
    up and down recall earlier messages. Elsewhere the prompt goes to stderr, stdout carrying replies only.
    """
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    terminal = sys.stdout.isatty()
    if terminal:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # a Python built without it (Windows): input() reads plain lines
            pass
    while True:
        try:
            if terminal:
                line = input(prompt) + "\n"
            else:
                print(prompt, end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            return
        yield line


def run(args):
    checkpoint = checkpoint_or_newest_run(args.model_checkpoint, args.runs_dir, "interact.py")
    set_seed(args.seed)
    persona = choose_persona(args, checkpoint)
    parts = args.ranker.split("+") if args.rerank > 1 else []
    bert, biencoder = load_ranker_models(parts, args.ranker_checkpoint)
    tokenizer, model, layout = load_tokenizer_and_model(checkpoint, input_format=args.input_format)
    if args.model and args.model != model.config.model_type:
        sys.exit(f"interact.py: --model {args.model}, but {checkpoint} holds a {model.config.model_type} model")
    problem = mc_rerank_error(args.rerank if "mc" in parts else 0, model, checkpoint)
    if problem:
        sys.exit(f"interact.py: error: {problem}")
    model.to(args.device).eval()
    rankers = Rankers(model, layout, args.device, bert, biencoder, args.max_history)
    config = DecodingConfig.from_args(args, no_sample=args.no_sample)
    configs = rerank_configs(config, args.rerank, args.rerank_greedy)  # each turn's rows: samples (and greedy)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    persona_ids = [encode(s) for s in persona]
    max_len = model_max_length(model)
    overflow = layout.reply_overflow(args.max_length, max_len)
    if overflow:
        sys.exit(f"interact.py: error: --max_length {args.max_length}: {overflow}")

    def show_persona():
        print("Persona: " + (" ".join(persona) if persona else "(none: this data has no personas)"), file=sys.stderr)

    print(f"Chatting with {checkpoint} ({COMMANDS})", file=sys.stderr)
    show_persona()
    history, history_text = [], []
    for line in user_lines(">>> "):
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history, history_text = [], []
            print("(a new conversation)", file=sys.stderr)
            continue
        if text == "/persona":
            show_persona()
            continue
        if re.fullmatch(r"/[a-z]+", text):  # a command, not chat
            print(f"Unknown command {text}: {COMMANDS}", file=sys.stderr)
            continue
        history.append(encode(text))
        history_text.append(text)
        history, history_text = history[-(2 * args.max_history + 1):], history_text[-(2 * args.max_history + 1):]
        context = layout.context_inputs(persona_ids, history, max_len, args.max_length)
        replies = generate(model, [context] * len(configs), layout, configs, generator=generator)
        texts = [" ".join(reply_text(tokenizer, r).split()) for r in replies]  # one line each
        best = rankers.best(args.ranker, persona, history_text, context, replies, texts) if len(replies) > 1 else 0
        history.append(replies[best])
        history_text.append(texts[best])
        print(texts[best], flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is a KeyboardInterrupt
    logging.basicConfig(level=logging.WARNING)
    try:
        run(get_args())
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except (DataError, DialogFormatError, FileNotFoundError, IsADirectoryError, InputFormatError) as e:
        sys.exit(f"interact.py: error: {e}")
