"""Decoding settings: the one check of the settings a user gives (the command line, the app, the Ray engine,
`VisionGPTCaptioner` and `evaluate` all call `check_decoding`), and what `generate` uses for each setting."""

SAMPLING = ("temperature", "top_p", "top_k")
# The settings users choose, by `generate`'s names, and how the command line spells each. Messages name both, so one
# message serves a command-line user and a Python caller.
FLAGS = {"num_beams": "--num-beams", "max_new_tokens": "--max-new-tokens", "do_sample": "--do-sample",
         "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
         "num_return_sequences": "--num-captions"}


def _named(name: str) -> str:
    return f"{FLAGS[name]} ({name})"


def settings_in_use(generation_config, given: dict, names) -> dict:
    """The value generate uses for each of `names`: the one given, else the model's generation config's, else
    generate's own default (transformers 5 leaves unset fields None in the config), so that rows record what was
    used."""
    from transformers import GenerationConfig

    library = GenerationConfig._get_default_generation_params()
    used = {}
    for name in names:
        candidates = (given.get(name), getattr(generation_config, name, None), library.get(name))
        used[name] = next((value for value in candidates if value is not None), None)
    return used


def check_decoding(given: dict, generation_config) -> tuple[dict, dict]:
    """
    Check decoding settings a user gave (`generate`'s names; None or absent: not given, so the model's
    `generation_config` decides) and return `(generate kwargs, used)`: the kwargs hold the settings given, and `used`
    every setting of `FLAGS` as `generate` will use it, with the sampling ones None unless sampling. Raises a
    ValueError that names the setting (flag and keyword) and says what to do.
    """
    for name in ("num_beams", "max_new_tokens", "num_return_sequences"):
        if given.get(name) is not None and given[name] < 1:
            raise ValueError(f"{_named(name)} must be at least 1, got {given[name]}.")
    if given.get("temperature") is not None and given["temperature"] <= 0:
        raise ValueError(f"{_named('temperature')} must be positive, got {given['temperature']}; for deterministic "
                         f"captions drop {_named('do_sample')} instead.")
    if given.get("top_p") is not None and not 0 < given["top_p"] <= 1:
        raise ValueError(f"{_named('top_p')} must be in (0, 1], got {given['top_p']}.")
    if given.get("top_k") is not None and given["top_k"] < 0:
        raise ValueError(f"{_named('top_k')} must be 0 (off) or more, got {given['top_k']}.")
    used = settings_in_use(generation_config, given, FLAGS)
    if not used["do_sample"]:
        ignored = [name for name in SAMPLING if given.get(name) is not None]
        if ignored:
            one = len(ignored) == 1
            raise ValueError(f"{', '.join(map(_named, ignored))} only matter{'s' if one else ''} with "
                             f"{_named('do_sample')}; add it, or drop {'it' if one else 'them'}.")
        if used["num_return_sequences"] > used["num_beams"]:
            raise ValueError(f"{_named('num_return_sequences')} {used['num_return_sequences']} needs at least as many "
                             f"beams (the model uses {_named('num_beams')} {used['num_beams']}), or "
                             f"{_named('do_sample')} for sampled captions.")
        for name in SAMPLING:
            used[name] = None  # greedy and beam search never read them
    return {name: value for name, value in given.items() if value is not None}, used


__all__ = ["FLAGS", "SAMPLING", "check_decoding", "settings_in_use"]
