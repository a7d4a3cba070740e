import socket
import threading
import time

import pytest

from askexpert.errors import ConfigError
from askexpert.measure.energy import PowerModel, account, radio_j
from askexpert.measure.link import LinkModel
from askexpert.measure.netem import DelayRelay, LinkUnavailable, NamespaceLink, can_emulate
from askexpert.measure.profiles import LinkPreset, builtin_devices, link_catalogue, load_device, load_link


def test_builtin_profiles_load_and_cite_sources() -> None:
    names = builtin_devices()
    assert {"raspberry-pi-4", "jetson-orin-nano", "jetson-agx-orin", "desktop-gpu"} <= set(names)
    for name in names:
        profile = load_device(name)
        assert profile.sources and profile.active_w >= profile.idle_w
    assert set(link_catalogue().links) == {"wired", "wifi", "lte"}
    with pytest.raises(ConfigError, match="unknown device profile 'toaster'"):
        load_device("toaster")
    with pytest.raises(ConfigError, match="unknown link preset"):
        load_link("carrier-pigeon")


def test_custom_profile_file_is_validated(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntier: edge\nidle_w: 1\nactive_w: 2\nthreads: 1\nslowdown: 3\nsources: [me]\n")
    assert load_device(str(path)).slowdown == 3
    path.write_text("name: mine\ntier: cloud\nidle_w: 1\nactive_w: 2\nthreads: 1\nslowdown: 3\nsources: [me]\n")
    with pytest.raises(ConfigError, match="invalid device profile"):
        load_device(str(path))


def test_power_and_radio_model_reproduce_a_hand_computed_example() -> None:
    edge, near = PowerModel(load_device("raspberry-pi-4")), PowerModel(load_device("desktop-gpu"))
    preset, radio = load_link("wifi")  # 20 Mbit/s up, 50 down, Huang et al. Wi-Fi coefficients
    link = LinkModel(preset)
    # 3,096 bytes up: 3096*8/20e6 s at (283.17*20 + 132.86) mW; 200 bytes down: 200*8/50e6 s at (137.01*50 + 132.86) mW
    expected_radio = (3096 * 8 / 20e6) * (283.17 * 20 + 132.86) / 1e3 + (200 * 8 / 50e6) * (137.01 * 50 + 132.86) / 1e3
    assert radio_j(radio, link, 3096, 200) == pytest.approx(expected_radio, rel=1e-12)
    e = account(
        edge,
        near,
        radio,
        link,
        edge_compute_s=0.010,
        wait_s=0.005,
        up_bytes=3096,
        down_bytes=200,
        near_edge_compute_s=0.0002,
    )
    assert e.edge_compute_j == pytest.approx(6.4 * 0.010)
    assert e.edge_wait_j == pytest.approx(2.7 * 0.005)
    assert e.near_edge_j == pytest.approx(450.0 * 0.0002)
    assert e.total_j == pytest.approx(e.edge_compute_j + e.edge_wait_j + e.radio_j + e.near_edge_j)
    assert e.edge_j + e.radio_j + e.near_edge_j == pytest.approx(e.total_j)


def test_link_model() -> None:
    model = LinkModel(LinkPreset(up_mbps=10, down_mbps=40, rtt_ms=20, loss=0.0))
    assert model.round_trip_s(125_000, 5_000) == pytest.approx(0.020 + 0.1 + 0.001)
    lossy = LinkModel(LinkPreset(up_mbps=10, down_mbps=40, rtt_ms=20, loss=0.5))
    assert lossy.round_trip_s(0, 0) == pytest.approx(0.020 + 0.020)


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_delay_relay_adds_the_round_trip() -> None:
    srv, port = _echo_server()
    with DelayRelay(("127.0.0.1", port), rtt_ms=60, jitter_ms=0, loss=0) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as c:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                c.sendall(b"ping")
                assert c.recv(10) == b"ping"
                times.append(time.perf_counter() - t0)
    srv.close()
    assert min(times) >= 0.058  # no reply comes back sooner than the emulated round trip (no upper bound: load)


needs_root = pytest.mark.skipif(can_emulate() is not None, reason=f"no namespace link here: {can_emulate()}")


@needs_root
def test_namespace_link_is_torn_down_when_the_run_fails() -> None:
    link = NamespaceLink(LinkPreset(up_mbps=10, down_mbps=10, rtt_ms=10))
    with pytest.raises(RuntimeError, match="boom"):
        with link:
            assert link.exists() and link.methods["rate"] in ("tbf", "netem")
            raise RuntimeError("boom")
    assert not link.exists()


@needs_root
def test_namespace_link_is_torn_down_when_setup_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import askexpert.measure.netem as netem

    real = netem._run

    def failing(*cmd: str, check: bool = True):
        if cmd[:1] == ("tc",) or cmd[3:4] == ("tc",):
            raise LinkUnavailable("tc exploded")
        return real(*cmd, check=check)

    monkeypatch.setattr(netem, "_run", failing)
    link = NamespaceLink(LinkPreset(up_mbps=10, down_mbps=10, rtt_ms=10))
    with pytest.raises(LinkUnavailable, match="tc exploded"):
        with link:
            pass
    monkeypatch.setattr(netem, "_run", real)
    assert not link.exists()
    assert real("ip", "link", "show", link.host_dev, check=False).returncode != 0


def test_not_root_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import askexpert.measure.netem as netem

    monkeypatch.setattr(netem.os, "geteuid", lambda: 1000)
    with pytest.raises(LinkUnavailable, match="not running as root"):
        with NamespaceLink(LinkPreset(up_mbps=1, down_mbps=1, rtt_ms=1)):
            pass


def test_rapl_meter_reads_powercap_and_handles_wraparound(tmp_path) -> None:
    from askexpert.measure.energy import RaplMeter

    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): must not be double counted
    meter = RaplMeter(tmp_path)
    assert meter.read_j() == 0.0
    (zone / "energy_uj").write_text("500\n")  # wrapped past the range: 1,000 + 500 µJ later
    assert meter.read_j() == pytest.approx(0.0015)
    (zone / "energy_uj").write_text("2500\n")
    assert meter.read_j() == pytest.approx(0.0035)
    with pytest.raises(OSError, match="no RAPL package zones"):
        RaplMeter(tmp_path / "intel-rapl:0:0")
