"""The command line: aad-pod-identity's flags, validated at start."""

import pytest

from nmi.cli import COMPAT_FLAGS, build_parser, settings_from
from nmi.config import ConfigError, OperationMode
from nmi.flags import compat_warnings, go_style


def parse(*argv: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(go_style(list(argv)))
    return settings_from(args, env or {})


def test_defaults_match_aad_pod_identity() -> None:
    s = parse("--node", "n1")
    assert (s.listen_address, s.port, s.metadata_ip, s.metadata_port) == (
        "127.0.0.1",
        2579,
        "169.254.169.254",
        80,
    )
    assert (s.http_probe_port, s.prometheus_port, s.ipt_update_interval_sec) == (8085, 9090, 60)
    assert (
        s.retry_attempts_for_created,
        s.retry_attempts_for_assigned,
        s.find_identity_retry_interval,
    ) == (16, 4, 5.0)
    assert s.metadata_header_required and not s.block_instance_metadata
    assert s.operation_mode is OperationMode.STANDARD and not s.force_namespaced


def test_go_style_booleans_and_klog_verbosity() -> None:
    s = parse(
        "--node=n1",
        "--forceNamespaced",
        "--metadata-header-required=false",
        "--block-instance-metadata=true",
        "-v=4",
        "--operation-mode=MANAGED",
    )
    assert s.force_namespaced and not s.metadata_header_required and s.block_instance_metadata
    assert s.verbosity == 4 and s.operation_mode is OperationMode.MANAGED


def test_env_force_namespaced() -> None:
    assert parse("--node", "n", env={"FORCENAMESPACED": "true"}).force_namespaced


@pytest.mark.parametrize(
    "argv",
    [
        ["--MICNamespace", "kube-system"],
        ["--enableScaleFeatures=true"],
        ["--enableProfile"],
        ["--custom-user-agent", "x/1"],
        ["--logtostderr"],
        ["-alsologtostderr=false"],
    ],
)
def test_compat_flags_are_accepted_and_warn(argv: list[str]) -> None:
    """Each compatibility flag parses and leaves one warning naming it and saying why."""
    args = build_parser().parse_args(go_style(["--node", "n", *argv]))
    settings_from(args, {})
    [warning] = compat_warnings(args, COMPAT_FLAGS)
    name = argv[0].split("=")[0].lstrip("-")
    assert warning.startswith(f"--{name} has no effect: ")
    assert len(warning) > len(f"--{name} has no effect: ") + 10


def test_no_warning_without_compat_flags() -> None:
    args = build_parser().parse_args(["--node", "n"])
    assert compat_warnings(args, COMPAT_FLAGS) == []


def test_go_flag_spellings() -> None:
    """Go's flag package reads one or two dashes; klog's -v4 / -v=4."""
    assert go_style(["-node=n", "-v4", "-h", "--x", "-5", "--", "-keep"]) == [
        "--node=n",
        "--v=4",
        "-h",
        "--x",
        "-5",
        "--",
        "-keep",
    ]
    s = parse("-node", "n1", "-forceNamespaced", "-nmi-port=2580")
    assert s.node_name == "n1" and s.force_namespaced and s.port == 2580


@pytest.mark.parametrize(
    "argv",
    [
        ["--node", "n", "--nmi-port", "70000"],
        ["--node", "n", "--operation-mode", "weird"],
        ["--node", "n", "--forceNamespaced=maybe"],
        ["--node", "n", "--retry-attempts-for-created", "-1"],
        ["--node", "n", "--unknown-flag"],
    ],
)
def test_bad_values_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2


def test_missing_node_and_bad_address_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        parse()
    with pytest.raises(ConfigError):
        parse("--node", "n", "--metadata-ip", "not-an-ip")


def test_authority_hosts() -> None:
    s = parse("--node", "n", "--allowed-authority-hosts", "127.0.0.1:8443, login.example.com")
    assert s.authority_host_allowed("127.0.0.1:8443")
    assert s.authority_host_allowed("login.microsoftonline.com")
    assert s.authority_host_allowed("login.microsoftonline.com:443")
    assert not s.authority_host_allowed("evil.example.com")
    assert not s.authority_host_allowed("login.microsoftonline.com:8443")
