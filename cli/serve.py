"""`hetero serve`: open the model, listen at once, load in the background, then answer.

The port opens before the weights are read so that /health can say "loading" (front-ends and
supervisors poll it); the model's header and plan are checked first, in the foreground, so a
wrong path or a plan that cannot fit is one line and exit code 2, as everywhere else.
"""

import re
import socket
import threading
from pathlib import Path

from cli.main import err_console, load_with_progress  # the console the loading bars are drawn on
from hetero.chat_template import ChatTemplate
from modelfile.errors import HeteroError


def default_alias(path: Path) -> str:
    """The file's name without the split suffix and extension: the id clients select."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", Path(path).name.removesuffix(".gguf"))


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise HeteroError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def read_template(path: Path | None) -> str | None:
    """A chat template file's text, parsed once here so that a broken one fails before loading."""
    if path is None:
        return None
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HeteroError(f"--chat-template-file {path}: cannot read it ({e})") from None
    ChatTemplate(source, "", "", str(path))
    return source


def run_server(
    path, host, port, api_key, alias, reasoning, temperature, top_p, max_queue, template_file, load_options
) -> None:
    import uvicorn

    from hetero.model import check_runnable, default_plan
    from hetero.sampling import SamplingParams
    from hetero.server.app import ServerState, create_app
    from hetero.server.worker import Worker
    from modelfile.gguf_file import GGUFModelFile
    from placement.planner import roomy_cache_slots

    template = read_template(template_file)
    check_port_free(host, port)
    with err_console.status("opening the model"):
        file = GGUFModelFile(path)
        plan_keys = ("n_ctx", "gpu_mem", "overcommit")
        options = {k: load_options[k] for k in plan_keys}
        slots = load_options["cache_slots"]
        if slots is None:  # as many conversations as the RAM the plan leaves holds, up to a few
            slots = roomy_cache_slots(default_plan(file, **options))
        plan = default_plan(file, **options, cache_slots=slots)
        check_runnable(plan, load_options["overcommit"])
    state = ServerState(alias or default_alias(path), api_key, SamplingParams(temperature, 0, top_p), reasoning)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            model = load_with_progress(file, plan=plan, threads=load_options["threads"])
            if template is not None:
                tok = model.tokenizer
                tok.chat = ChatTemplate(template, tok.bos_text, tok.eos_text, str(template_file))
            state.worker = Worker(model, max_queue, plan.cache_slots)
            where = f"[{host}]" if ":" in host else host
            err_console.print(f"ready: http://{where}:{port}/v1 serves [bold]{state.alias}[/] "
                              f"(context {model.n_ctx} tokens, prompt cache: {plan.cache_slots} conversation"
                              f"{'s' if plan.cache_slots > 1 else ''}); "
                              "Ctrl-C stops", highlight=False)  # fmt: skip
        except BaseException as e:  # reported by the main thread, after the server stops
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=load, name="hetero-load", daemon=True)
    err_console.print(f"listening on {host}:{port}; loading {Path(path).name}", highlight=False)
    loader.start()
    server.run()
    if state.worker is not None:
        state.worker.close()
    if failure:
        raise failure[0]
    if not server.started:
        raise HeteroError(f"the server on {host}:{port} did not start")
