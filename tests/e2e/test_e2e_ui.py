"""The web UI in a real browser (issue 19): Debian's Chromium, headless, driven by playwright,
against `axoneme ui --allow-apply` and an agent on eBPF with real pods and traffic.

The seed scenario in the browser: with a default deny staged (audit), load the service map,
click an edge and see its flows with the deciding policy (and what the staged deny would
drop); write the default deny, enforced, in the policy editor (first a bad port: the error is
shown at its field), see the what-if delta (the observed flows it would drop), take the
recommended policies as drafts, see that deny + recommended flips no observed flow, apply, and
see the edge of a new, unexpected connection turn red after its probe is dropped. Each step
writes a screenshot to docs/ui/ with AXONEME_UPDATE_SCREENSHOTS=1 (the README shows them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _obsproc  # tests/ is on sys.path (tests/conftest.py)
import _testnet
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

REPO = Path(__file__).resolve().parents[2]
# the README's screenshots are refreshed with AXONEME_UPDATE_SCREENSHOTS=1; any other run
# writes them to a temporary directory (a test run never changes tracked files)
SHOTS = REPO / "docs" / "ui" if os.environ.get("AXONEME_UPDATE_SCREENSHOTS") == "1" else \
    Path(tempfile.gettempdir()) / f"axoneme-ui-shots-{os.getpid()}"
CHROMIUM = "/usr/lib/chromium/chromium"
AXONEME = str(Path(sys.executable).parent / "axoneme")
RED = "rgb(198,40,40)"  # VERDICT_COLOURS.DROPPED in ui/src/map.jsx
ORANGE = "rgb(239,108,0)"  # VERDICT_COLOURS.AUDIT

WEB_INGRESS = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"""


DENY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"""


def _browser_or_skip() -> Any:
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"no Chromium at {CHROMIUM}: scripts/bootstrap installs Debian's chromium"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[Any]:
    """``start(socket)`` -> the URL of an `axoneme ui --allow-apply` on a free loopback port,
    once it accepts; stopped by its PID (tests/_obsproc.py)."""
    with contextlib.ExitStack() as stack:
        def start(socket: str) -> str:
            port = _obsproc.free_port()
            log = tmp_path / "ui.log"
            stack.enter_context(_obsproc.daemon(
                [AXONEME, "ui", "--listen", f"127.0.0.1:{port}", "--allow-apply",
                 "--api-socket", socket], log, port))
            url = f"http://127.0.0.1:{port}/"
            assert _testnet.poll(lambda: f"axoneme ui: serving {url} (policies can be applied"
                                 in log.read_text(), timeout=10), log.read_text()
            return url

        yield start


def _curl(agent: Any, pod: str, url: str, timeout: str = "2") -> str:
    return agent.pod_exec(pod, "curl", "-s", "-m", timeout, "-o", "/dev/null", "-w",
                          "%{http_code}", url, namespace="shop").stdout


def _reach(agent: Any, pod: str, url: str) -> bool:
    return bool(_testnet.poll(lambda: _curl(agent, pod, url) == "200", timeout=10))


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(300)  # let the layout and fonts settle
    page.screenshot(path=str(SHOTS / name))


def _edge_state(page: Any, edge: str) -> dict[str, Any] | None:
    return page.evaluate("""(id) => {
        const cy = window.axonemeUI && window.axonemeUI.cy;
        const e = cy && cy.getElementById(id);
        if (!e || e.empty()) return null;
        return {verdict: e.data('verdict'), colour: e.style('line-color')};
    }""", edge)


# The point on an edge farthest from every other edge and off every node (straight edges):
# where a click hits that edge and no other.
_CLEAR_POINT = """(id) => {
    const cy = window.axonemeUI.cy, e = cy.getElementById(id);
    const s = e.source().renderedPosition(), t = e.target().renderedPosition();
    const others = cy.edges().filter((x) => x.id() !== id)
        .map((x) => [x.source().renderedPosition(), x.target().renderedPosition()]);
    const boxes = cy.nodes().map((n) => n.renderedBoundingBox());
    const dist = (p, a, b) => {
        const dx = b.x - a.x, dy = b.y - a.y, l = dx * dx + dy * dy;
        const k = l ? Math.max(0, Math.min(1, ((p.x - a.x) * dx + (p.y - a.y) * dy) / l)) : 0;
        return Math.hypot(p.x - a.x - k * dx, p.y - a.y - k * dy);
    };
    let best = null, bestD = -1;
    for (let i = 10; i <= 90; i += 5) {
        const p = {x: s.x + (t.x - s.x) * i / 100, y: s.y + (t.y - s.y) * i / 100};
        if (boxes.some((b) => p.x >= b.x1 && p.x <= b.x2 && p.y >= b.y1 && p.y <= b.y2)) continue;
        const d = others.length ? Math.min(...others.map(([a, b]) => dist(p, a, b))) : 1e9;
        if (d > bestD) { bestD = d; best = p; }
    }
    return best;
}"""


def _click_edge(page: Any, edge: str, title: str) -> None:
    """A real mouse click on the edge in the canvas, until its flows are shown. The map's
    box and the edge's point are taken afresh for every try (a map laid out again, or an
    error line above it, moves both), and a try waits for the panel to render (slow under
    load) before clicking again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    shown = page.get_by_test_id("edge-title")
    for _ in range(8):
        box = page.get_by_test_id("service-map").bounding_box()
        point = page.evaluate(_CLEAR_POINT, edge)
        assert point is not None and box is not None, edge
        page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])
        try:
            page.wait_for_function(
                "(t) => { const h = document.querySelector('[data-testid=edge-title]');"
                " return h && h.innerText === t; }", arg=title, timeout=3_000)
            return
        except PlaywrightTimeout:  # try again from a fresh point
            pass
    got = shown.inner_text() if shown.count() else None
    raise AssertionError(f"a click on {edge} did not show {title!r} (the panel shows {got!r})")


def test_ui_seed_scenario_in_chromium(agent_factory: Any, datapath_probe: Any, ui_server: Any,
                                      tmp_path: Path) -> None:
    sync_playwright = _browser_or_skip()
    reason = datapath_probe("ebpf")
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    ap = agent_factory("ebpf")
    (tmp_path / "index.html").write_text("ok\n")
    ap.cli("namespace", "create", "shop", "--labels", "team=shop", check=True)
    server = ["python3", *_testnet.http_server_argv("0.0.0.0", 80, str(tmp_path))]
    web = ap.pod_run("web", *server, namespace="shop", labels="app=web")
    api = ap.pod_run("api", "python3", *_testnet.http_server_argv("0.0.0.0", 8080, str(tmp_path)),
                     namespace="shop", labels="app=api")
    ap.pod_run("client", "sleep", "infinity", namespace="shop", labels="app=client")
    (tmp_path / "web-ingress.yaml").write_text(WEB_INGRESS)
    ap.cli("policy", "apply", "-f", str(tmp_path / "web-ingress.yaml"), check=True)
    # the seed scenario starts with a default deny staged: counted, not enforced
    (tmp_path / "deny.yaml").write_text(DENY)
    ap.cli("policy", "apply", "--audit", "-f", str(tmp_path / "deny.yaml"), check=True)
    ident = {ep["pod"]: ep["identity"] for ep in ap.json("endpoint", "list")}
    client_web = f"id:{ident['shop/client']}>id:{ident['shop/web']}"
    client_api = f"id:{ident['shop/client']}>id:{ident['shop/api']}"

    # the observed traffic: client -> web:80 (allowed by web-ingress), web -> api:8080
    assert _reach(ap, "client", f"http://{web}/"), ap.log()
    assert _reach(ap, "web", f"http://{api}:8080/"), ap.log()

    url = ui_server(str(ap.socket))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(60_000)  # a loaded machine (CI) is slow to render
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url)

            # 1. the service map: workloads by identity, edges from the flows; the staged
            # default deny would drop client -> web: AUDIT, orange
            page.wait_for_function("(id) => { const cy = window.axonemeUI && window.axonemeUI.cy;"
                                   " return cy && !cy.getElementById(id).empty(); }",
                                   arg=client_web, timeout=20_000)
            assert _edge_state(page, client_web) == {"verdict": "AUDIT", "colour": ORANGE}
            assert page.get_by_test_id("agent-info").inner_text().startswith("ebpf")
            assert _edge_state(page, client_api) is None  # not observed (yet)
            _shot(page, "1-service-map.png")

            # 2. click the edge: its flows, each with the deciding policy
            _click_edge(page, client_web, "shop/client → shop/web")
            flows = page.get_by_test_id("edge-flows")
            flows.wait_for(timeout=10_000)
            page.get_by_text("allowed by NetworkPolicy shop/web-ingress").first.wait_for(
                timeout=10_000)
            # which flows the staged deny would drop, and by which policy
            page.get_by_text("would be dropped by NetworkPolicy shop/default-deny").first.wait_for(
                timeout=10_000)
            assert "shop/client → shop/web" in flows.inner_text()
            _shot(page, "2-edge-flows.png")

            # 3. the editor: a default deny, first with a bad port (the error at its field)
            page.get_by_test_id("tab-editor").click()
            live = page.get_by_test_id("edit-live")
            live.wait_for()
            assert "NetworkPolicy shop/default-deny" in live.inner_text()  # the staged one
            # the form speaks CiliumNetworkPolicy too: endpointSelector, fromEndpoints, toPorts
            page.get_by_test_id("new-cnp").click()
            page.get_by_test_id("form-namespace").fill("shop")
            page.get_by_test_id("rule-ingress-0-peer").fill("app=client")
            page.get_by_test_id("rule-ingress-0-add-port").click()
            cnp = page.get_by_test_id("yaml").input_value()
            for text in ("kind: CiliumNetworkPolicy", "endpointSelector: {}", "fromEndpoints:",
                         "app: client", "toPorts:", 'port: "80"'):
                assert text in cnp, cnp
            page.wait_for_function(
                "() => document.querySelector('[data-testid=validity]').textContent === 'valid'")
            page.get_by_test_id("remove-draft").click()
            page.get_by_test_id("new-np").click()
            page.get_by_test_id("form-name").fill("default-deny")
            page.get_by_test_id("form-namespace").fill("shop")
            page.get_by_test_id("form-egress-enforced").check()
            page.get_by_test_id("form-add-ingress").click()
            page.get_by_test_id("rule-ingress-0-add-port").click()
            page.get_by_test_id("rule-ingress-0-port-0").fill("99999")
            error = page.locator("[data-testid=field-error]"
                                 "[data-field='spec.ingress[0].ports[0].port']")
            error.wait_for(timeout=10_000)
            # shown under the port field itself
            assert page.get_by_test_id("rule-ingress-0").locator(
                "[data-testid=field-error]").count() == 1
            assert page.get_by_test_id("whatif").is_disabled()
            _shot(page, "3-editor-validation.png")

            # 4. no rules at all: a valid default deny; its what-if delta against live traffic
            page.get_by_test_id("rule-ingress-0").get_by_text("remove rule").click()
            yaml_text = page.get_by_test_id("yaml").input_value()
            assert "policyTypes:\n    - Ingress\n    - Egress" in yaml_text, yaml_text
            page.wait_for_function("() => !document.querySelector('[data-testid=whatif]').disabled",
                                   timeout=10_000)
            page.get_by_test_id("whatif").click()
            delta = page.get_by_test_id("delta-flows")
            delta.wait_for(timeout=30_000)
            text = delta.inner_text()
            assert "shop/client → shop/web" in text and "shop/web → shop/api" in text, text
            assert text.count("would drop") >= 2, text
            _shot(page, "4-whatif-delta.png")

            # 5. the recommendations, as drafts: deny + recommended flips no observed flow
            page.get_by_test_id("tab-recommend").click()
            page.get_by_test_id("recommend").click()
            page.get_by_test_id("use-all").wait_for(timeout=30_000)
            summary = page.get_by_test_id("recommend-summary").inner_text()
            assert "3 policies" in summary, summary
            page.get_by_test_id("use-all").click()
            assert page.get_by_test_id("drafts").get_by_text("recommend-web").count() == 1
            page.wait_for_function("() => !document.querySelector('[data-testid=whatif]').disabled",
                                   timeout=10_000)
            page.get_by_test_id("whatif").click()
            page.get_by_test_id("delta-no-flow-flips").wait_for(timeout=30_000)
            probes = page.get_by_test_id("delta-probes").inner_text()
            assert "shop/client → shop/api" in probes, probes  # predicted: a new connection drops
            _shot(page, "5-recommended-whatif.png")

            # 6. apply; the observed traffic still flows, an unexpected connection turns red
            page.get_by_test_id("apply").click()
            result = page.get_by_test_id("apply-result")
            result.wait_for(timeout=30_000)
            assert result.inner_text().startswith("applied "), result.inner_text()
            assert "NetworkPolicy shop/default-deny" in result.inner_text()
            names = {p["name"] for p in ap.json("policy", "list")}
            assert {"default-deny", "recommend-web", "recommend-api", "recommend-client"} <= names
            assert _reach(ap, "client", f"http://{web}/"), ap.log()
            assert _curl(ap, "client", f"http://{api}:8080/", "1") != "200"
            page.get_by_test_id("tab-map").click()
            page.wait_for_function(
                "(id) => { const e = window.axonemeUI.cy.getElementById(id);"
                " return !e.empty() && e.data('verdict') === 'DROPPED'; }",
                arg=client_api, timeout=20_000)
            assert _edge_state(page, client_api)["colour"] == RED
            _click_edge(page, client_api, "shop/client → shop/api")
            page.get_by_test_id("edge-flows").get_by_text("DROPPED").first.wait_for(timeout=10_000)
            _shot(page, "6-denied-edge.png")
            assert errors == [], errors
        except BaseException:
            failed = tmp_path / "failed.png"
            page.screenshot(path=str(failed))
            print(f"the page at the failure: {failed}; agent log:\n{ap.log()[-3000:]}")
            raise
        finally:
            browser.close()
    for shot in sorted(SHOTS.glob("*.png")):
        assert 0 < shot.stat().st_size < 400_000, shot  # small enough for the README
