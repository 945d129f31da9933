"""Helpers the engine tests share: stepping an LLMEngine until it is idle, reading an AsyncEngine stream."""


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
