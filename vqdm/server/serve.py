"""`vqdm serve`: check the configured folders, set up logging and torch's threads, run the app
under uvicorn with the drain on SIGTERM (`vqdm.server.drain`), and turn the outcome into an exit
status."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from vqdm.errors import ConfigError
from vqdm.models import read_model_index
from vqdm.server import threads
from vqdm.server.app import create_app, drain
from vqdm.server.drain import FLUSH_S, DrainingServer
from vqdm.server.image_store import check_folder
from vqdm.server.logs import configure_logging
from vqdm.server.loras import lora_specs
from vqdm.server.settings import Settings

log = logging.getLogger("vqdm.server")


def check_folders(settings: Settings) -> None:
    """What start-up reads or writes on disk, before anything loads: one line naming the problem."""
    for spec in settings.model_specs():
        if spec.path is not None:
            read_model_index(spec.path)  # raises ModelFolderError naming what is wrong
    for lora in lora_specs(settings.loras):
        if not lora.path.is_file():
            raise FileNotFoundError(f"lora {lora.name!r}: no such file {lora.path}")
    if settings.image_store_dir is not None:
        check_folder(Path(settings.image_store_dir))


def serve(settings: Settings) -> int:
    check_folders(settings)
    configure_logging(settings.log_level, settings.json_logs)
    threads.apply(settings.cpu_threads)
    failure: list[str] = []
    holder: dict = {}

    def on_fatal(error: str) -> None:
        failure.append(error)
        holder["server"].should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    # uvicorn's own graceful wait only flushes the replies the drain produced (server.drain).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=FLUSH_S, lifespan="on")
    server = holder["server"] = DrainingServer(config, lambda: drain(getattr(app.state, "vqdm", None)))
    server.run()
    if failure:
        raise ConfigError(f"start-up failed: {failure[0]}")
    state = getattr(app.state, "vqdm", None)
    stuck = state.dispatcher.failures.stuck_devices() if state is not None else []
    if stuck:  # a hung kernel would block interpreter exit (it joins worker threads): leave now
        log.critical("exiting with the worker on %s still stuck", ", ".join(stuck))
        logging.shutdown()
        os._exit(3)
    return 0
