"""The listeners' TLS against Mozilla's "intermediate" profile, scanned by sslyze.

sslyze (a real TLS scanner, with its own OpenSSL builds through nassl) tries
every protocol version, cipher suite and curve against each listener:
STARTTLS on mx and submission, implicit TLS on submissions.  Its Mozilla
checker (:mod:`sslyze.mozilla_tls_profile`, profile 5.7) must report no
protocol, cipher, curve or vulnerability issue.  Only certificate issues that
come from the test certificate itself are tolerated (see
:data:`TEST_CERTIFICATE_ISSUES`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import HOSTNAME, ServerThread

sslyze = pytest.importorskip("sslyze")
from sslyze import (  # noqa: E402
    CertificateInfoExtraArgument,
    ProtocolWithOpportunisticTlsEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (  # noqa: E402
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

# Certificate trust/validity problems of the trustme test certificate, not
# of the server's TLS settings; nothing else is excluded:
# - it is valid until the year 3000, beyond Mozilla's 366-day maximum;
# - sslyze's path validation fails even with the test CA given as
#   custom_ca_file (its store rejects trustme's CA certificate, whose serial
#   number cryptography reports as not positive).
TEST_CERTIFICATE_ISSUES = {"maximum_certificate_lifespan", "certificate_path_validation"}

SCANNER_FRIENDLY = """
[connections]
max_new_per_minute = 0
max_per_ip = 0
"""


def scan(port: int, ca_file: Path, starttls: bool) -> ServerScanResult:
    network = ServerNetworkConfiguration(
        tls_server_name_indication=HOSTNAME,
        tls_opportunistic_encryption=(ProtocolWithOpportunisticTlsEnum.SMTP
                                      if starttls else None))
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("127.0.0.1", port),
        network_configuration=network,
        scan_commands=set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)))
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


@pytest.mark.parametrize("listener", ["mx", "submission", "submissions"])
def test_listener_meets_mozilla_intermediate(make_server: Callable[..., ServerThread],
                                             ca_file: Path, listener: str) -> None:
    # sslyze opens hundreds of connections a minute: lift the connection
    # limits (they are tested elsewhere), not the TLS settings.
    st = make_server(SCANNER_FRIENDLY)
    result = scan(st.port(listener), ca_file, starttls=listener != "submissions")
    issues: dict[str, str] = {}
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE))
    except ServerNotCompliantWithTlsConfiguration as exc:
        issues = dict(exc.issues)
    unexpected = {k: v for k, v in issues.items() if k not in TEST_CERTIFICATE_ISSUES}
    assert unexpected == {}
