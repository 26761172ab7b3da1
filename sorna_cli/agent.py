"""`sorna agent`: run the reference agent on this host."""
from __future__ import annotations

import click

from .context import CliContext, pass_cli


@click.command()
@click.option("--rpc-addr", "agent_rpc_addr", help="tcp://IP:PORT to bind the RPC ROUTER on "
              "(default tcp://127.0.0.1:6001, port from SORNA_AGENT_PORT; beyond loopback "
              "only with keys).")
@click.option("--key", "agent_key", type=click.Path(dir_okay=False),
              help="This agent's CurveZMQ secret key file (`sorna keys generate`).")
@click.option("--gateway-keys", "gateway_keys", type=click.Path(),
              help="Public key file, or folder of them, of the gateways to accept.")
@click.option("--manager", "agent_managers", multiple=True,
              help="Manager events address (tcp://HOST:PORT); repeatable.")
@click.option("--instance-id", "agent_instance_id",
              help="Stable instance id (default i-<hostname>).")
@click.option("--advertise-host", "agent_advertise_host",
              help="Host managers should use to reach this agent.")
@click.option("--max-kernels", "agent_max_kernels", type=int,
              help="Kernels this agent runs at most.")
@click.option("--pool-size", "agent_pool_size", type=int,
              help="Warm runner processes kept per language.")
@click.option("--heartbeat-interval", "heartbeat_interval", type=float, help="Seconds.")
@click.option("--idle-timeout", "agent_idle_timeout", type=float,
              help="Seconds without use before a kernel is destroyed.")
@click.option("--exec-timeout", "agent_exec_timeout", type=float,
              help="Maximum seconds per execute.")
@click.option("--max-mem", "agent_max_mem", help="Address-space limit per kernel, e.g. 512m.")
@click.option("--stats-interval", "agent_stats_interval", type=float,
              help="Seconds between instance_stats events.")
@click.option("--max-output", "agent_max_output", help="Output kept per execute, e.g. 1m.")
@click.option("--max-procs", "agent_max_procs", type=int, help="Processes per kernel.")
@click.option("--max-cpu-time", "agent_max_cpu_time", type=float, help="CPU seconds per kernel.")
@click.option("--max-file-size", "agent_max_file_size", help="Largest file a kernel may write.")
@click.option("--event-queue-size", "agent_event_queue_size", type=int,
              help="Events kept while no manager listens (oldest heartbeats dropped first).")
@click.option("--isolation", "agent_isolation",
              type=click.Choice(["auto", "best-effort", "none"]),
              help="auto: the full kernel sandbox (refuses to start where the host has no "
                   "mount namespaces); best-effort: what the host allows; none: plain processes.")
@click.option("--scratch-dir", "agent_scratch_dir", type=click.Path(file_okay=False),
              help="Folder for kernel working directories.")
@pass_cli
def agent(cli: CliContext, agent_managers: tuple[str, ...], **flags: object) -> None:
    """Run the reference agent: sandboxed kernels for the managers."""
    if agent_managers:
        flags["agent_managers"] = list(agent_managers)
    cli.reload(**flags)
    config = cli.serve_logging()  # the agent is a long-running service: INFO to stderr
    from sorna_agent import AgentStartError, run
    try:
        run(config)
    except AgentStartError as exc:
        raise click.ClickException(f"the agent cannot start: {exc}") from None

