"""Helpers the engine tests share: stepping an LLMEngine until it is idle, reading an AsyncEngine stream,
holding a prompt in its tokenization."""

import threading


def run(eng):
    """Step until nothing is left; {request_id: final output}."""
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


async def collect(engine, prompt, params, rid):
    """Read one `engine.generate` stream to its end: (every output's delta_text, the last output)."""
    deltas, last = [], None
    async for out in engine.generate(prompt, params, rid):
        deltas.append(out.delta_text)
        last = out
    return deltas, last


def hold_tokenizing(engine, method: str, text_only: bool = False):
    """Make `engine.<method>` (what AsyncEngine.generate calls off the loop to tokenize a prompt) wait
    until released, as a long text prompt does; with text_only, only calls whose prompt is text wait.
    Returns (tokenizing, release): events set once a call waits / to let it go on."""
    tokenizing, release = threading.Event(), threading.Event()
    make = getattr(engine, method)

    def slow_make(*args, **kw):
        if not text_only or isinstance(args[0], str):
            tokenizing.set()
            release.wait(10)
        return make(*args, **kw)

    setattr(engine, method, slow_make)
    return tokenizing, release
