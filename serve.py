"""Serve a trained run: a chat page in the browser and an OpenAI-compatible chat-completions API.

    python serve.py                                    # the newest run under runs/, on http://127.0.0.1:8000
    python serve.py --model_checkpoint runs/x --port 8080 --no_sample
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "system", "content": "i love cats."}, {"role": "user", "content": "hi!"}]}'

A system message is the persona (one sentence per line); user and assistant messages are the history. The flags
below are the defaults of every request; a request's max_tokens, temperature (0: greedy), top_p, seed and n
override them. Requests waiting when the model is free are decoded in one batch.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the imports below load (seconds): exit 130, no traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import asyncio
import logging
from argparse import ArgumentParser
from pathlib import Path

import torch
import uvicorn

from classifier import DataError
from decoding import DecodingConfig, add_decoding_args, check_decoding_args
from layouts import InputFormatError
from modeling import add_run_args, load_tokenizer_and_model, model_max_length
from rankers import Rankers, add_rerank_args, check_rerank_args, load_ranker_models, mc_rerank_error
from serving import ChatModel, ServerSettings, create_app
from utils import checkpoint_or_newest_run, seed_type

logger = logging.getLogger(__file__)
GRACEFUL_SHUTDOWN_S = 10  # on SIGTERM or Ctrl-C, replies being decoded get this long to finish


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown ends the replies still unfinished after GRACEFUL_SHUTDOWN_S with an answer
    (a 503, or a streamed error event and `data: [DONE]`) before it closes their connections."""

    async def shutdown(self, sockets=None):
        ending = asyncio.ensure_future(self.config.app.state.end_replies(GRACEFUL_SHUTDOWN_S))
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()


def get_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000)")
    parser.add_argument("--served_model_name", type=str, default="",
                        help="The model id of /v1/models and responses (default: the run directory's name)")
    parser.add_argument("--personality", action="append", default=[],
                        help="Persona sentence of requests without a system message; repeat for several")
    parser.add_argument("--max_history", type=int, default=2, help="Previous exchanges kept in history (default: 2)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    add_decoding_args(parser)
    add_rerank_args(parser)
    parser.add_argument("--seed", type=seed_type, default=None,
                        help="Seed of the sampling of requests that give none (default: none, a fresh draw)")
    parser.add_argument("--max_concurrency", type=int, default=32,
                        help="Requests queued or decoding at once; more get HTTP 429 (default: 32)")
    parser.add_argument("--max_batch_size", type=int, default=8,
                        help="Most replies decoded in one batch (a request's n choices count each; a request of more is "
                             "decoded in several) (default: 8)")
    parser.add_argument("--max_tokens_limit", type=int, default=512,
                        help="Largest max_tokens a request may ask for (default: 512)")
    parser.add_argument("--log_level", type=str, default="info", help="uvicorn's log level (default: info)")
    args = parser.parse_args(argv)
    check_decoding_args(parser, args)
    check_rerank_args(parser, args)
    if args.max_batch_size < 1 or args.max_concurrency < 1:
        parser.error("--max_batch_size and --max_concurrency: at least 1")
    if args.max_length > args.max_tokens_limit:
        parser.error(f"--max_length {args.max_length}: above --max_tokens_limit {args.max_tokens_limit}")
    return args


def build_app(args):
    """Load the run (once) and make the app, as `python serve.py` would serve it."""
    checkpoint = checkpoint_or_newest_run(args.model_checkpoint, args.runs_dir, "serve.py")
    parts = args.ranker.split("+") if args.rerank > 1 else []
    bert, biencoder = load_ranker_models(parts, args.ranker_checkpoint)
    tokenizer, model, layout = load_tokenizer_and_model(checkpoint, input_format=args.input_format)
    problem = mc_rerank_error(args.rerank if "mc" in parts else 0, model, checkpoint)
    if problem:
        sys.exit(f"serve.py: error: {problem}")
    model.to(args.device).eval()
    settings = ServerSettings(model_name=args.served_model_name or Path(checkpoint.rstrip("/")).name,
                              decoding=DecodingConfig.from_args(args, no_sample=args.no_sample),
                              max_history=args.max_history, persona=tuple(args.personality),
                              max_tokens_limit=args.max_tokens_limit, rerank=args.rerank, ranker=args.ranker,
                              rerank_greedy=args.rerank_greedy, seed=args.seed)
    chat_model = ChatModel(model, tokenizer, layout, settings, model_max_length(model),
                           Rankers(model, layout, args.device, bert, biencoder, args.max_history))
    overflow = layout.reply_overflow(args.max_length, chat_model.max_len)
    if overflow:  # every request giving no max_tokens would be refused
        sys.exit(f"serve.py: error: --max_length {args.max_length}: {overflow}")
    logger.info("Serving %s as %r", checkpoint, settings.model_name)
    return create_app(chat_model, max_concurrency=args.max_concurrency, max_batch_size=args.max_batch_size)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is a KeyboardInterrupt
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    arguments = get_args()
    try:
        application = build_app(arguments)
    except (DataError, FileNotFoundError, IsADirectoryError, InputFormatError) as e:
        sys.exit(f"serve.py: error: {e}")
    except KeyboardInterrupt:  # while the run loads
        sys.exit(130)
    print(f"Chat page: http://{arguments.host}:{arguments.port}/  API: http://{arguments.host}:{arguments.port}/v1",
          file=sys.stderr, flush=True)
    # uvicorn's own limit is a backstop: by then the replies have their answers
    server = Server(uvicorn.Config(application, host=arguments.host, port=arguments.port,
                                   log_level=arguments.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S + 5))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it caught again, once it has shut down
        pass
    if not server.started:
        sys.exit(3)  # as uvicorn.run: it could not start (the port is taken, ...) and logged why
