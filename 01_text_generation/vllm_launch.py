"""The vLLM server process: this worker's settings turned into vLLM's server flags, checked by
vLLM's own parser, then vLLM's OpenAI server run on them.

It runs under the interpreter that has vLLM (`VLLM_PYTHON`; in Dockerfile.vllm `/opt/vllm`, an
environment of its own because vllm 0.32 and runpod 1.12 require incompatible fastapi releases),
started by the worker's relay (vllm_server.py) as `VLLM_PYTHON vllm_launch.py HOST PORT`. So it
imports nothing but the standard library at load, and vLLM inside the functions that need it:
the worker's own environment, which has no vLLM, can import it to check what vLLM is there.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SETTINGS_ERROR = "vLLM settings error: "  # how the server process reports refused settings
VLLM_CHECK_TIMEOUT_S = 60.0  # importing nothing, a Python's start and a module search take well under a second

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")

# ---------------------------------------------------------------------------------------------
# Configuration: environment variables -> vLLM server flags (pure; the flag table comes from vLLM)
# ---------------------------------------------------------------------------------------------
# This worker's (and worker-vllm's) names that are not the upper-case name of their flag.
ENV_ALIASES = {
    "MODEL_NAME": "MODEL",
    "MODEL_REVISION": "REVISION",
    "TOKENIZER_NAME": "TOKENIZER",
    "CUSTOM_CHAT_TEMPLATE": "CHAT_TEMPLATE",
    # worker-vllm's names, so its endpoint templates work unchanged.
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "SERVED_MODEL_NAME",
    "VLLM_CONFIG_FILE": "CONFIG",  # a YAML file of flags; the other settings win over it, as in `vllm serve`
}
# Raw server arguments appended after all the others (so they win), checked by vLLM's parser like
# the rest: for a flag that has no environment form, or one a template cannot express.
EXTRA_ARGS = "VLLM_EXTRA_ARGS"
# Settings where 0 means "unset": vLLM refuses 0, and endpoint templates (worker-vllm's among
# them) carry MAX_NUM_BATCHED_TOKENS=0 for "let vLLM choose". A 0 elsewhere (SEED, CPU_OFFLOAD_GB)
# is a real value.
ZERO_MEANS_UNSET = frozenset({"MAX_NUM_BATCHED_TOKENS"})
# Settings of earlier vLLM releases that 0.32's server no longer has, still set by older endpoint
# templates: ignored with a warning that says what took their place, instead of a start that dies
# on an unknown flag. (tests/text_generation/test_vllm_engine.py checks none of them is a flag.)
REMOVED_SETTINGS = {
    "SWAP_SPACE": "removed from vLLM: its V1 engine has no CPU swap space",
    "DISABLE_LOG_REQUESTS": "removed from vLLM: requests are not logged unless ENABLE_LOG_REQUESTS=true",
    "GUIDED_DECODING_BACKEND": 'removed from vLLM: set STRUCTURED_OUTPUTS_CONFIG, e.g. {"backend": "xgrammar"}',
    "GUIDED_DECODING_DISABLE_FALLBACK": "removed from vLLM: set STRUCTURED_OUTPUTS_CONFIG",
    "GUIDED_DECODING_DISABLE_ANY_WHITESPACE": "removed from vLLM: set STRUCTURED_OUTPUTS_CONFIG",
    "GUIDED_DECODING_DISABLE_ADDITIONAL_PROPERTIES": "removed from vLLM: set STRUCTURED_OUTPUTS_CONFIG",
    "TASK": "removed from vLLM: set RUNNER and CONVERT",
    "ROPE_SCALING": 'removed from vLLM: set HF_OVERRIDES, e.g. {"rope_scaling": {...}}',
    "ROPE_THETA": 'removed from vLLM: set HF_OVERRIDES, e.g. {"rope_theta": 1000000}',
    "NUM_LOOKAHEAD_SLOTS": "removed from vLLM: speculative decoding is set by SPECULATIVE_CONFIG",
    "CUDA_GRAPH_SIZES": "removed from vLLM: set COMPILATION_CONFIG's cudagraph_capture_sizes",
    "MAX_SEQ_LEN_TO_CAPTURE": "removed from vLLM: set COMPILATION_CONFIG",
    "MAX_CONTEXT_LEN_TO_CAPTURE": "removed from vLLM: set COMPILATION_CONFIG",
    "DISABLE_FRONTEND_MULTIPROCESSING": "removed from vLLM",
    "ENABLE_LORA_BIAS": "removed from vLLM",
    "LORA_EXTRA_VOCAB_SIZE": "removed from vLLM",
    "MAX_NUM_PARTIAL_PREFILLS": "removed from vLLM",
    "MAX_LONG_PARTIAL_PREFILLS": "removed from vLLM",
    "OVERRIDE_POOLER_CONFIG": "removed from vLLM: set POOLER_CONFIG",
    "TOKENIZER_POOL_SIZE": "removed from vLLM",
    "TOKENIZER_POOL_TYPE": "removed from vLLM",
    "TOKENIZER_POOL_EXTRA_CONFIG": "removed from vLLM",
    "DISABLE_MM_PREPROCESSOR_CACHE": "removed from vLLM: set MM_PROCESSOR_CACHE_GB=0",
    "ENABLE_MULTIMODAL_ENCODER_DATA_PARALLEL": "removed from vLLM: set MM_ENCODER_TP_MODE=data",
    "NUM_REDUNDANT_EXPERTS": "removed from vLLM: set EPLB_CONFIG",
    "EPLB_WINDOW_SIZE": "removed from vLLM: set EPLB_CONFIG",
    "EPLB_STEP_INTERVAL": "removed from vLLM: set EPLB_CONFIG",
    "EPLB_LOG_BALANCEDNESS": "removed from vLLM: set EPLB_CONFIG",
    "LOGITS_PROCESSOR_PATTERN": "removed from vLLM: set LOGITS_PROCESSORS",
    "USE_V2_BLOCK_MANAGER": "removed from vLLM: it is the only block manager",
    "PREEMPTION_MODE": "removed from vLLM",
    "SCHEDULER_DELAY_FACTOR": "removed from vLLM",
    "NUM_SCHEDULER_STEPS": "removed from vLLM",
    "MULTI_STEP_STREAM_OUTPUTS": "removed from vLLM",
    "DISABLE_ASYNC_OUTPUT_PROC": "removed from vLLM",
    # worker-vllm's own settings of earlier releases.
    "DEFAULT_BATCH_SIZE": "streamed tokens are sent as fast as the network takes them (coalesce.py)",
    "DEFAULT_MIN_BATCH_SIZE": "streamed tokens are sent as fast as the network takes them (coalesce.py)",
    "DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "streamed tokens are sent as fast as the network takes them (coalesce.py)",
    "RAW_OPENAI_OUTPUT": "OpenAI routes always stream vLLM's own server-sent events",
}
# Any of these set (by variable, config file or extra arguments) leaves parallelism to the user;
# otherwise a worker with several GPUs splits the model over all of them (see default_parallelism).
PARALLELISM_SETTINGS = ("TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "DATA_PARALLEL_SIZE")
# Flags never taken from the environment: the worker sets the address itself (HOST, PORT, UDS),
# MODEL is spelt MODEL_NAME, a config file or --help would bypass the checks, and HF_TOKEN must
# not appear on a command line (vLLM reads it from the environment anyway). API_KEY: Runpod
# authenticates callers; the loopback server needs none.
NOT_FROM_ENV = frozenset({"HOST", "PORT", "UDS", "MODEL", "CONFIG", "HELP", "HF_TOKEN", "API_KEY", "HEADLESS", "GRPC"})
# QUANTIZATION keeps this worker's names for bitsandbytes (shared with the transformers engine).
QUANTIZATION_NAMES = {"bnb-4bit": "bitsandbytes"}
TRANSFORMERS_ONLY_QUANTIZATION = ("bnb-8bit",)
# Names this worker reads for itself, never mistaken for misspelt vLLM flags.
WORKER_ENV = frozenset(
    {
        "ENGINE",
        "MAX_CONCURRENCY",
        "DEFAULT_MAX_TOKENS",
        "MAX_GENERATION_SECONDS",
        "SERVED_MODEL_NAME",
        "VLLM_PYTHON",
        EXTRA_ARGS,
    }
)
NEAR_MISS_CUTOFF = 0.9  # difflib similarity above which an unknown name is reported as a likely typo

FlagKind = Literal["value", "list", "append", "switch", "paired"]


@dataclass(frozen=True)
class Flag:
    option: str  # "--max-num-seqs"
    kind: FlagKind  # value: one value; list: nargs="+"; append: repeated; switch: store_true; paired: --x/--no-x


class SettingsError(ValueError):
    """A setting vLLM cannot take; the message names the environment variable."""


def env_name(option: str) -> str:
    """`--max-num-seqs` -> `MAX_NUM_SEQS`."""
    return option.removeprefix("--").replace("-", "_").upper()


def parse_bool(name: str, value: str) -> bool:
    if value.lower() in TRUE_VALUES:
        return True
    if value.lower() in FALSE_VALUES:
        return False
    raise SettingsError(f"{name}={value!r}: expected true or false")


def list_values(name: str, value: str) -> list[str]:
    """A list flag's values: a JSON list or one JSON object (objects become JSON strings, as
    vLLM's --lora-modules takes them: worker-vllm's `{"name": ..., "path": ...}` form) or, otherwise,
    shell words (`a=/path b=/path`)."""
    if value.lstrip().startswith(("[", "{")):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as error:
            raise SettingsError(f"{name}: not valid JSON ({error})") from None
        items = items if isinstance(items, list) else [items]
        return [item if isinstance(item, str) else json.dumps(item) for item in items]
    try:
        return shlex.split(value)
    except ValueError as error:
        raise SettingsError(f"{name}: {error}") from None


def default_parallelism(gpus: int, configured: bool) -> list[str]:
    """Tensor parallelism over every GPU the worker has, unless the user configured any. Pure.

    A Runpod endpoint with 2 GPUs per worker is chosen for a model that needs both (a 70B model on
    2x80 GB); vLLM alone would load it on one GPU and fail. vLLM refuses at start, with its reason,
    a model whose attention heads do not divide by the count."""
    return ["--tensor-parallel-size", str(gpus)] if gpus > 1 and not configured else []


def server_argv(
    environ: Mapping[str, str], flags: Mapping[str, Flag], gpus: int = 0, config_keys: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """(vLLM server arguments, warnings) for the settings in `environ`. Pure.

    `flags` maps each flag's environment name to the flag (see `flag_table`); `gpus` is how many
    the worker sees and `config_keys` the environment names of the settings in VLLM_CONFIG_FILE.
    Unset or empty variables are left to vLLM's defaults. A value this function can already tell
    is wrong (a boolean that is not one, a quantization only the other engine has) raises
    `SettingsError`; vLLM's parser checks the rest.
    """
    warnings = []
    settings: dict[str, tuple[str, str]] = {}  # flag env name -> (the variable it came from, value)
    for name, value in sorted(environ.items()):
        if not value:
            continue
        if name in ZERO_MEANS_UNSET and value.strip() == "0":
            warnings.append(f"{name}=0 means unset: vLLM chooses it")
            continue
        if name in REMOVED_SETTINGS and name not in flags:
            warnings.append(f"{name} is ignored: {REMOVED_SETTINGS[name]}")
            continue
        target = ENV_ALIASES.get(name, name)
        if target in NOT_FROM_ENV and name not in ENV_ALIASES:
            continue
        if target not in flags:
            continue
        if target in settings:
            both = " and ".join(sorted((name, settings[target][0])))
            raise SettingsError(f"{both} both set {flags[target].option}: set one of them")
        settings[target] = (name, value)

    if "LORA_MODULES" in settings and "ENABLE_LORA" not in settings and "ENABLE_LORA" in flags:
        settings["ENABLE_LORA"] = ("LORA_MODULES", "true")  # adapters need LoRA support switched on
    if "QUANTIZATION" in settings:
        name, value = settings["QUANTIZATION"]
        if value in TRANSFORMERS_ONLY_QUANTIZATION:
            raise SettingsError(
                f"QUANTIZATION={value} needs ENGINE=transformers; vLLM takes bnb-4bit, awq, gptq, fp8, ..."
            )
        settings["QUANTIZATION"] = (name, QUANTIZATION_NAMES.get(value, value))

    argv: list[str] = []
    for target in sorted(settings):
        name, value = settings[target]
        flag = flags[target]
        if flag.kind == "switch":
            if parse_bool(name, value):
                argv.append(flag.option)
        elif flag.kind == "paired":
            argv.append(flag.option if parse_bool(name, value) else "--no-" + flag.option.removeprefix("--"))
        elif flag.kind == "list":
            argv += [flag.option, *list_values(name, value)]
        elif flag.kind == "append":
            for item in list_values(name, value):
                argv += [flag.option, item]
        else:
            argv += [flag.option, value]

    try:
        extra = shlex.split(environ.get(EXTRA_ARGS, ""))
    except ValueError as error:
        raise SettingsError(f"{EXTRA_ARGS}: {error}") from None
    extra_keys = {env_name(word.split("=", 1)[0]) for word in extra if word.startswith("--")}
    configured = any(key in settings or key in config_keys or key in extra_keys for key in PARALLELISM_SETTINGS)
    argv += default_parallelism(gpus, configured) + extra

    known = set(flags) | set(ENV_ALIASES) | WORKER_ENV | set(REMOVED_SETTINGS)
    for name in sorted(environ):
        if name in known or not environ[name] or not name.isupper():
            continue
        close = difflib.get_close_matches(name, list(flags), n=1, cutoff=NEAR_MISS_CUTOFF)
        if close:
            warnings.append(f"{name} is not a vLLM setting and is ignored; did you mean {close[0]}?")
    return argv, warnings


def flag_table(parser: argparse.ArgumentParser) -> dict[str, Flag]:
    """Every long flag of vLLM's server parser, by environment name."""
    table = {}
    for action in parser._actions:
        options = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
        if not options:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            kind: FlagKind = "paired"
        elif action.nargs == 0:
            kind = "switch"
        elif isinstance(action, argparse._AppendAction):
            kind = "append"
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            kind = "list"
        else:
            kind = "value"
        table[env_name(options[0])] = Flag(options[0], kind)
    return table


def vllm_parser() -> argparse.ArgumentParser:
    """vLLM's own server parser, raising instead of exiting on a bad argument."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm_server.py"))

    def refuse(message: str) -> None:
        raise SettingsError(message)

    parser.error = refuse  # type: ignore[method-assign]
    return parser


def config_keys(path: str | None) -> frozenset[str]:
    """The environment names of the settings in a `vllm serve` YAML config file."""
    if not path:
        return frozenset()
    import yaml

    try:
        with open(path) as file:
            settings = yaml.safe_load(file) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SettingsError(f"VLLM_CONFIG_FILE={path}: {error}") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"VLLM_CONFIG_FILE={path}: expected a mapping of vLLM settings")
    return frozenset(env_name(str(key)) for key in settings)


def checked_argv(environ: Mapping[str, str]) -> list[str]:
    """The server's arguments, parsed and checked by vLLM exactly as its server does at start."""
    import torch
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import validate_api_server_args
    from vllm.reasoning import ReasoningParserManager

    parser = vllm_parser()
    flags = flag_table(parser)
    gpus = torch.cuda.device_count()  # 0 on vLLM's CPU build
    argv, warnings = server_argv(environ, flags, gpus, config_keys(environ.get("VLLM_CONFIG_FILE")))
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    try:
        args = parser.parse_args(argv)
        validate_parsed_serve_args(args)
        validate_api_server_args(args)  # the tool-call parser's name
        parsers = ReasoningParserManager.list_registered()
        if args.reasoning_parser and args.reasoning_parser not in parsers:
            raise KeyError(f"invalid reasoning parser: {args.reasoning_parser} (choose from {', '.join(parsers)})")
    except (SettingsError, TypeError, ValueError, KeyError) as error:
        message = str(error.args[0] if error.args else error).removeprefix("Error: ")
        # vLLM names flags; say which variables set them.
        named = [
            f"--{target.lower().replace('_', '-')} is {target}" for target in flags if flags[target].option in message
        ]
        raise SettingsError(message + (f" ({', '.join(named)})" if named else "")) from None
    return argv


def serve(environ: Mapping[str, str], host: str, port: int) -> None:
    """The server process: check the settings, then run vLLM's own server entry point."""
    try:
        argv = checked_argv(environ)
    except SettingsError as error:
        print(SETTINGS_ERROR + str(error), file=sys.stderr, flush=True)
        sys.exit(2)
    from vllm.entrypoints.launchers.api_server.entry import main

    sys.argv = ["vllm_server.py", *argv, "--host", host, "--port", str(port)]
    main()


def vllm_installed(python: str) -> bool:
    """Whether the interpreter `python` can import vLLM (without importing it: that takes seconds)."""
    try:
        found = subprocess.run(
            [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
            capture_output=True,
            timeout=VLLM_CHECK_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0


if __name__ == "__main__":
    serve(os.environ, sys.argv[1], int(sys.argv[2]))
