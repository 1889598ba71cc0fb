"""``fedmdh node start`` and ``fedmdh deploy certs|coordinator|run|local`` (registered in cli.py).

Thin layers over :mod:`fedmdh.deploy` and :mod:`fedmdh.runtime`: an institution runs ``node
start`` on its own machine; the consortium runs ``deploy coordinator`` (a SuperLink) anywhere; a
submitter runs ``deploy run``; ``deploy local`` tries all of it on one machine.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmdh import defaults
from fedmdh.cli_output import DpClipOpt, DpDeltaOpt, DpNoiseOpt, dp_overrides
from fedmdh.errors import InputError

console = Console()
err_console = Console(stderr=True)


def _default(text: str, default: object) -> str:
    """Help text ending in ``[default: X]``, the brackets escaped (rich would take them for a style
    tag and drop them, leaving "Communication rounds .")."""
    return f"{text} {escape(f'[default: {default}]')}"


node_app = typer.Typer(name="node", help="Run an institution's node (its data and keys stay on this machine).",
                       no_args_is_help=True)
deploy_app = typer.Typer(name="deploy", help="Deploy a task across machines (Flower SuperLink and SuperNodes).",
                         no_args_is_help=True)

TargetOpt = Annotated[str, typer.Option("--target", help="Target column.")]
SuperlinkOpt = Annotated[str, typer.Option("--superlink", help="The SuperLink's address, HOST:PORT.")]
CaOpt = Annotated[Path, typer.Option("--root-certificates", help="The consortium's CA certificate (ca.crt).")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Column that is not a feature (repeatable).")]


# ---------------------------------------------------------------------- node


@node_app.command("start")
def node_start(
    data: Annotated[Path, typer.Option("--data", help="This institution's CSV file (never leaves this machine).")],
    target: TargetOpt,
    name: Annotated[str, typer.Option("--name", help="The institution's name in the federation.")],
    superlink: SuperlinkOpt,
    root_certificates: CaOpt,
    key: Annotated[Path, typer.Option("--key", help="This node's private key (registered with the coordinator).")],
    state: Annotated[Optional[Path], typer.Option(
        "--state", help=_default("The node's own folder: ledger key, client state, models.", "$FEDMDH_HOME/nodes/NAME, "
                                    "else ~/.fedmdh/nodes/NAME"))] = None,
    test: Annotated[Optional[Path], typer.Option(
        "--test", help="A shared test CSV: the node reports test metrics for it each round.")] = None,
    chain_rpc: Annotated[Optional[str], typer.Option(
        "--chain-rpc", help=_default("The chain node this institution trusts.", "the one the task names"))] = None,
    exclude: ExcludeOpt = None,
    port: Annotated[Optional[int], typer.Option("--port", help=_default("The SuperNode's local runtime port.", "a free one"))] = None,
) -> None:
    """Start this institution's node service and its Flower SuperNode; serve tasks until stopped (Ctrl-C)."""
    import logging

    from fedmdh.deploy.node_runner import run_node
    from fedmdh.deploy.watchdog import supervised
    from fedmdh.ledger.keys import fedmdh_home
    from fedmdh.runtime.node import NodeService, check_name

    check_name(name)
    folder = state or fedmdh_home() / "nodes" / name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    service = NodeService(name, data, target, folder, test=test, exclude=tuple(exclude or ()), chain_rpc=chain_rpc)
    err_console.print(f"fedmdh node {name}: ledger address {service.address}, state {folder}, SuperLink {superlink}",
                      highlight=False, markup=False)
    try:
        with supervised():  # the SuperNode and what it starts go with this process, whatever ends it
            run_node(service, superlink, root_certificates, key, port=port)
    except KeyboardInterrupt:
        err_console.print(f"fedmdh node {name}: stopped", highlight=False, markup=False)


# ---------------------------------------------------------------------- certificates and coordinator


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for the CA, the server certificate and node keys.")],
    host: Annotated[Optional[list[str]], typer.Option(
        "--host", help=_default("Host name or IP the nodes use to reach the SuperLink (repeatable).", "127.0.0.1 and localhost"))] = None,
    node: Annotated[Optional[list[str]], typer.Option(
        "--node", help="An institution to make a node key pair for (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing CA in --out.")] = False,
) -> None:
    """Make the consortium's CA, the SuperLink's TLS certificate and one key pair per node."""
    from fedmdh.deploy.certs import make_certs

    files = make_certs(out, hosts=tuple(host or ("127.0.0.1", "localhost")), nodes=tuple(node or ()),
                       overwrite=overwrite)
    console.print(f"wrote {files.ca}, {files.server_cert}, {files.server_key}"
                  + (f" and node keys in {out / 'nodes'}" if node else ""), highlight=False, markup=False)


@deploy_app.command("coordinator")
def coordinator(
    certs_dir: Annotated[Path, typer.Option("--certs", help="The folder `fedmdh deploy certs` wrote.")],
    port: Annotated[int, typer.Option("--port", help="The SuperLink's port (Fleet and Control API).")] = 9093,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    database: Annotated[Optional[Path], typer.Option(
        "--database", help=_default("The SuperLink's database (keeps registrations across restarts).", "FOLDER/superlink.db"))] = None,
    folder: Annotated[Optional[Path], typer.Option(
        "--folder", help=_default("The coordinator's folder: Flower home, logs.", "$FEDMDH_HOME/coordinator, else "
                                                                        "~/.fedmdh/coordinator"))] = None,
    register: Annotated[Optional[list[str]], typer.Option(
        "--register", help="NAME=KEY.pub: register an institution's node key (repeatable).")] = None,
) -> None:
    """Run the SuperLink (TLS, SuperNode authentication, no runtime installs) until stopped (Ctrl-C)."""
    from fedmdh.deploy.certs import CertFiles
    from fedmdh.deploy.flower import flower_env, register_node, superlink_argv, write_connection
    from fedmdh.deploy.processes import Services, check_port_free, listens, wait_until
    from fedmdh.deploy.watchdog import supervised
    from fedmdh.ledger.keys import fedmdh_home
    from fedmdh.runtime.node import check_name

    files = CertFiles(certs_dir / "ca.crt", certs_dir / "server.pem", certs_dir / "server.key", certs_dir)
    for p in (files.ca, files.server_cert, files.server_key):
        if not p.is_file():
            raise InputError(f"--certs {certs_dir}: {p.name} not found; run `fedmdh deploy certs` first.")
    pairs = []
    for item in register or ():
        name, sep, key = item.partition("=")
        if not sep or not Path(key).is_file():
            raise InputError(f"--register {item!r}: give NAME=PATH of an existing public key file.")
        pairs.append((check_name(name), Path(key)))
    folder = folder or fedmdh_home() / "coordinator"
    home = folder / "flwr"
    address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    check_port_free(port, host)
    write_connection(home, address, files.ca)
    with supervised(), Services(folder / "logs") as services:
        link = services.start("superlink", superlink_argv(files, port, database or folder / "superlink.db", host),
                              env=flower_env(home))
        wait_until(lambda: listens(link.pid, port, "127.0.0.1" if host in ("0.0.0.0", "::") else host), link,
                   "the SuperLink", timeout=60)
        for name, key in pairs:
            console.print(f"registered {name}: node id {register_node(home, key, name)}", highlight=False,
                          markup=False)
        console.print(f"SuperLink at {address} (pid {link.pid}, log {link.log}); Ctrl-C stops it", highlight=False,
                      markup=False)
        try:
            link.proc.wait()
        except KeyboardInterrupt:
            return
        raise InputError(f"the SuperLink exited with status {link.proc.returncode} (log {link.log}: {link.tail(3)})")


@deploy_app.command("chain")
def chain(
    state: Annotated[Path, typer.Option("--state", help="The chain's state file (deploy local: RUN/deploy/chain-state.json).")],
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 8545,
) -> None:
    """Run a local chain (anvil) from a state file until stopped: a trial's chain again, e.g. to verify its run."""
    from fedmdh.deploy.processes import Services, check_port_free, start_anvil
    from fedmdh.deploy.watchdog import supervised

    check_port_free(port)
    with supervised(), Services(state.parent / "logs") as services:
        svc, url = start_anvil(services, port=port, state_file=state)
        console.print(f"chain at {url} (pid {svc.pid}) from {state}; `fedmdh ledger verify RUN --chain-rpc {url}`; "
                      "Ctrl-C stops it", highlight=False, markup=False)
        try:
            svc.proc.wait()
        except KeyboardInterrupt:
            return
        raise InputError(f"the chain (anvil) exited with status {svc.proc.returncode} (log {svc.log}: {svc.tail(3)})")


# ---------------------------------------------------------------------- tasks


def _experiment(config: Optional[Path], target: Optional[str], algorithm: str, rounds: Optional[int],
                seed: Optional[int], dp: Optional[dict] = None, secure: bool = False) -> dict[str, Any]:
    """The task's experiment settings (config file overlaid with the options), validated."""
    from fedmdh.config import ExperimentConfig, read_toml
    from fedmdh.runtime.coordinator import DeployTask, experiment_settings

    kw = read_toml(config) if config is not None else {}
    for k in ("institutions", "test"):
        kw.pop(k, None)
    if target is not None:
        kw["target"] = target
    if "target" not in kw:
        raise InputError("missing --target; give it on the command line or in --config FILE.toml.")
    kw.update({k: v for k, v in (("rounds", rounds), ("first_seed", seed)) if v is not None})
    kw.update(algorithms=(algorithm,), seeds=1, **(dp or {}))
    cfg = ExperimentConfig(institutions=("institution-a", "institution-b"), test="", **kw)
    settings = experiment_settings(cfg)
    DeployTask("check", settings, 2, "", "", secure=secure).config()  # refuses references and simulator-only settings
    return settings


class _Progress:
    """Shows the coordinator's events: a bar on a terminal, plain lines otherwise."""

    def __init__(self, rounds: int, label: str) -> None:
        self.rounds = rounds
        self.label = label
        self.bar = None
        self.task = None
        if err_console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=err_console)
            self.bar.start()
            self.task = self.bar.add_task(label, total=rounds)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "round":
            text = f"{self.label} round {event['round']}/{self.rounds} rmse {event.get('rmse') or float('nan'):.4f}"
            if self.bar is not None:
                self.bar.update(self.task, completed=event["round"], description=text)
            else:
                err_console.print(text, highlight=False, markup=False)
        elif kind == "note":
            (self.bar.console if self.bar else err_console).print(f"  {event.get('message')}", highlight=False,
                                                                    markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_final(out: Path) -> None:
    final = json.loads((out / "final_metrics.json").read_text(encoding="utf-8"))
    table = Table("institution", "kept round", "RMSE", "MAE", "R2",
                  title=f"{final['algorithm']} deployed: test metrics (each institution's model, chosen on its own "
                        "validation rows)")
    for name, m in final["per_institution"].items():
        table.add_row(name, str(final["best_rounds"][name]), *(f"{m[k]:.4f}" if m.get(k) is not None else "-"
                                                              for k in ("rmse", "mae", "r2")))
    console.print(table)
    if final.get("missing"):  # named on chain too; each adds its model when its node is back
        console.print(f"missing when the task ended (named on chain): {', '.join(final['missing'])}; with their nodes "
                      f"back, `fedmdh deploy resume --out {out}` adds their models (`fedmdh ledger verify` lists them)",
                      highlight=False, markup=False)
    console.print(f"run record in {out} (ledger/, metrics.jsonl, final_metrics.json); task contract "
                  f"{final['contract']}", highlight=False, markup=False)


def _check_out(out: Path, overwrite_hint: bool = False) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        hint = ", or pass --overwrite to replace what an earlier fedmdh run or trial wrote there" if (
            overwrite_hint and out.is_dir()) else ""
        raise InputError(f"--out {out}: exists and is not an empty folder; give a new folder{hint}.")


RoundsOpt = Annotated[Optional[int], typer.Option("--rounds", help=_default("Communication rounds.", defaults.ROUNDS))]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help=_default("Seed.", defaults.FIRST_SEED))]
AlgorithmOpt = Annotated[str, typer.Option("--algorithm", help="Algorithm to train.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML file with the task's settings.")]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for nodes and for each round's steps.")]
QuorumOpt = Annotated[Optional[int], typer.Option(
    "--quorum", help=_default("Commitments a round needs to close without every institution.", "a majority"))]


#: the coordinator's keystore when --keystore is not given (fedmdh.ledger.keys.default_keystore)
KEYSTORE_DEFAULT = "$FEDMDH_KEYSTORE, else $FEDMDH_HOME/keystore, else ~/.fedmdh/keystore"

SecureOpt = Annotated[bool, typer.Option(
    "--secure", help="Confidential aggregation: the setup statistics and every update travel and are stored only "
                     "encrypted under threshold CKKS (OpenFHE), keys shared by the nodes (fedavg, fedprox, fedgan, fedmdh; "
                     "docs/security.md).")]
RecordOpt = Annotated[Optional[Path], typer.Option(
    "--record-messages", help="Write every message the coordinator sends and receives into this folder (an audit of "
                              "what it sees).")]


def _secure_check(secure: bool, algorithm: str) -> None:
    if not secure:
        return
    from fedmdh.secure.aggregation import check_covered
    from fedmdh.secure.backend import unavailable_reason

    check_covered(algorithm)
    reason = unavailable_reason()
    if reason:
        raise InputError(f"--secure needs OpenFHE at the coordinator and at every node: {reason}")


def _timeout_opt(default: float):
    return Annotated[float, typer.Option(
        "--round-timeout", help="Seconds a round waits for a silent institution before it closes with a quorum "
                                "(0: wait for every institution).")]


def _follow(superlink: str, root_certificates: Path, task, rounds: int) -> None:
    """Submit ``task`` to the SuperLink and show its progress until it ends."""
    import tempfile

    from fedmdh.deploy.flower import submit, write_connection
    from fedmdh.deploy.watchdog import supervised

    with supervised(), tempfile.TemporaryDirectory(prefix="fedmdh-flwr-") as home:
        write_connection(home, superlink, root_certificates)
        progress = _Progress(rounds, task.algorithm)
        try:
            for event in submit(home, task.to_json()):
                progress(event)
                if event.get("event") == "failed":
                    raise InputError(f"the task failed: {event.get('message')}")
        finally:
            progress.close()


@deploy_app.command("run")
def deploy_run(
    superlink: SuperlinkOpt,
    root_certificates: CaOpt,
    chain_rpc: Annotated[str, typer.Option("--chain-rpc", help="JSON-RPC URL of the chain the institutions use.")],
    out: Annotated[Path, typer.Option("--out", help="Run record folder (written by the coordinator, on its machine).")],
    nodes: Annotated[int, typer.Option("--nodes", help="How many institutions take part.")],
    target: Annotated[Optional[str], typer.Option("--target", help="Target column.")] = None,
    algorithm: AlgorithmOpt = "fedavg",
    rounds: RoundsOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    keystore: Annotated[Optional[Path], typer.Option(
        "--keystore", help=_default("The coordinator's keystore (its relay key).", KEYSTORE_DEFAULT))] = None,
    wait: WaitOpt = 600.0,
    quorum: QuorumOpt = None,
    round_timeout: _timeout_opt(300.0) = 300.0,
    secure: SecureOpt = False,
    record_messages: RecordOpt = None,
    dp_noise: DpNoiseOpt = None,
    dp_clip: DpClipOpt = None,
    dp_delta: DpDeltaOpt = None,
) -> None:
    """Submit a task to a running SuperLink and follow it to its end."""
    from fedmdh.ledger.keys import default_keystore
    from fedmdh.runtime.coordinator import DeployTask

    _check_out(out)
    _secure_check(secure, algorithm)
    experiment = _experiment(config, target, algorithm, rounds, seed, dp_overrides(dp_noise, dp_clip, dp_delta),
                             secure)
    task = DeployTask(secrets.token_hex(6), experiment, nodes, chain_rpc, str(out.resolve()),
                      keystore=str((keystore or default_keystore()).resolve()), wait_s=wait, quorum=quorum,
                      round_timeout=round_timeout, secure=secure,
                      record_messages=str(record_messages.resolve()) if record_messages else None)
    task.config()
    _follow(superlink, root_certificates, task, int(experiment["rounds"]))
    _print_final(out)


@deploy_app.command("resume")
def deploy_resume(
    superlink: SuperlinkOpt,
    root_certificates: CaOpt,
    out: Annotated[Path, typer.Option("--out", help="The task's run record folder (a copy, on a new coordinator).")],
    task_id: Annotated[Optional[str], typer.Option("--task", help="The task's id (checked against the record).")] = None,
    chain_rpc: Annotated[Optional[str], typer.Option(
        "--chain-rpc", help=_default("JSON-RPC URL of the chain.", "the one the task was started with"))] = None,
    keystore: Annotated[Optional[Path], typer.Option(
        "--keystore", help=_default("This coordinator's keystore (its relay key).", "the task's"))] = None,
    wait: Annotated[Optional[float], typer.Option(
        "--wait", help=_default("Seconds to wait for nodes and for each round's steps.", "the task's"))] = None,
) -> None:
    """Continue a deployed task from its last finalized round (after the coordinator was lost, or the task
    stopped short of a quorum), or, once it is archived, have the institutions it names missing add their
    models: any institution can run it, with a SuperLink of its own."""
    from dataclasses import replace

    from fedmdh.runtime.coordinator import TASK_FILE, DeployTask

    record = out / TASK_FILE
    if not record.is_file():
        raise InputError(f"--out {out}: no {TASK_FILE} here; give the run record folder of a deployed task.")
    try:
        task = DeployTask.from_json(json.loads(record.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{record}: not a deployed task record ({exc}).") from None
    if task_id is not None and task_id != task.task_id:
        raise InputError(f"--task {task_id}: {out} records task {task.task_id}.")
    task = replace(task, resume=True, out_dir=str(out.resolve()), chain_rpc=chain_rpc or task.chain_rpc,
                   keystore=str(keystore.resolve()) if keystore else task.keystore,
                   wait_s=wait if wait is not None else task.wait_s)
    _follow(superlink, root_certificates, task, int(task.experiment["rounds"]))
    _print_final(out)


@deploy_app.command("local")
def deploy_local(
    out: Annotated[Path, typer.Option("--out", help="Folder for the run record, the nodes' folders and the logs.")],
    institutions: Annotated[list[Path], typer.Option("--institutions", help="One CSV file per institution.")],
    target: TargetOpt,
    test: Annotated[Optional[Path], typer.Option("--test", help="Shared test CSV (each node reports on it).")] = None,
    algorithm: AlgorithmOpt = "fedavg",
    rounds: RoundsOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    exclude: ExcludeOpt = None,
    wait: WaitOpt = 600.0,
    quorum: QuorumOpt = None,
    round_timeout: _timeout_opt(30.0) = 30.0,
    secure: SecureOpt = False,
    record_messages: RecordOpt = None,
    dp_noise: DpNoiseOpt = None,
    dp_clip: DpClipOpt = None,
    dp_delta: DpDeltaOpt = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace what an earlier fedmdh run or trial wrote in --out (else a non-empty --out is "
                            "refused).")] = False,
    fault: Annotated[Optional[list[str]], typer.Option(
        "--fault", help="Rehearse a failure (repeatable): coordinator@R (kill -9 the SuperLink and ServerApp before "
                        "round R, then resume with a new one), node:NAME@R1-R2 (kill NAME's node before round R1, "
                        "start it again before R2; node:NAME@R1: it stays down), chain@R (restart the chain node "
                        "from its state file).")] = None,
) -> None:
    """Try a deployment on this machine: a chain, a SuperLink and one node per institution, as real processes.

    Every process is stopped at the end, also on Ctrl-C or error, and if this command is killed (even
    by SIGKILL) a watchdog stops them and what they started.
    """
    from fedmdh.data.io import unique_names
    from fedmdh.deploy.local import Fault, run_task, start_local
    from fedmdh.deploy.processes import Services
    from fedmdh.deploy.watchdog import supervised
    from fedmdh.outputs import DEPLOY_NAMES, RUN_NAMES, claim_output_dir
    from fedmdh.runtime.coordinator import DeployTask
    from fedmdh.runtime.node import check_name

    if not overwrite:
        _check_out(out, overwrite_hint=True)
    _secure_check(secure, algorithm)
    if len(institutions) < 2:
        raise InputError("give at least two institution files (--institutions A.csv B.csv ...).")
    for p in [*institutions, *([test] if test else [])]:
        if not p.is_file():
            raise InputError(f"{p}: file not found; check the path.")
    names = [check_name(n) for n in unique_names(institutions)]
    experiment = _experiment(config, target, algorithm, rounds, seed, dp_overrides(dp_noise, dp_clip, dp_delta),
                             secure)
    faults = [Fault.parse(f) for f in fault or ()]
    for f in faults:
        if f.kind == "node" and f.name not in names:
            raise InputError(f"--fault node:{f.name}@...: no institution {f.name!r} here (they are {', '.join(names)}).")
        if max(f.rounds()) > int(experiment["rounds"]):
            raise InputError(f"--fault {f.kind}@{f.at}: the task has only {experiment['rounds']} rounds.")
        if f.at < 2:
            raise InputError(f"--fault {f.kind}@{f.at}: faults strike before round 2 or later (round 1 sets up).")
    out = out.resolve()
    say = (lambda line: err_console.print(line, highlight=False, markup=False))
    # --overwrite removes only what an earlier run or trial wrote there, never an input of this one
    with claim_output_dir(out, overwrite=overwrite, inputs=[*institutions, *(p for p in (test, config) if p)],
                          declared=(*RUN_NAMES, *DEPLOY_NAMES)), supervised(), \
            Services(out / "deploy" / "logs") as services:
        dep = start_local(out, dict(zip(names, (p.resolve() for p in institutions))), target,
                          test.resolve() if test else None, services, exclude=tuple(exclude or ()), say=say)
        task = DeployTask(secrets.token_hex(6), experiment, len(names), dep.chain_url, str(out),
                          keystore=str(out / "deploy" / "keystore"), wait_s=wait, quorum=quorum,
                          round_timeout=round_timeout, secure=secure,
                          record_messages=str(record_messages.resolve()) if record_messages else None)
        task.config()
        progress = _Progress(int(experiment["rounds"]), algorithm)
        try:
            run_task(dep, task.to_json(), on_event=progress, faults=faults, say=say)
        finally:
            progress.close()
        from fedmdh.audit import verify

        report = verify(out)
        say(str(report).splitlines()[0] + " (fedmdh ledger verify, while the chain runs)")
    _print_final(out)
