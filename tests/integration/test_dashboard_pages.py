"""The dashboard's server-rendered pages, read over HTTP without a browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, Header, HTTPException

from tests.integration.test_http import API, make_app, serve, wait_status

DASHBOARD = f"{API}/_dashboard"
ATTACK = "<script>alert(1)</script><img src=x onerror=alert(2)>"


async def test_dashboard_is_off_by_default(tmp_path: Path) -> None:
    """Without dashboard=True the path is no route: it is looked up as a job (404)."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        response = await client.get(DASHBOARD)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")


async def test_dashboard_page_escapes_job_data(tmp_path: Path) -> None:
    """Params, task errors and messages reach the HTML escaped, never as markup."""
    app, _ = make_app(tmp_path, dashboard=True)
    async with serve(app) as client:
        job = await client.post(API, json={"task": "boom", "params": {"x": ATTACK}})
        job_id = job.json()["id"]
        await wait_status(client, job_id, "failed")
        listing = await client.get(DASHBOARD)
        detail = await client.get(f"{DASHBOARD}/{job_id}")

    for response in (listing, detail):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "<script>alert" not in response.text
        assert "<img src=x" not in response.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert job_id in listing.text
    assert "boom: the input file is corrupt" in detail.text


async def test_dashboard_hides_tracebacks_unless_the_app_exposes_them(
    tmp_path: Path,
) -> None:
    """The job page shows a traceback only with expose_tracebacks, as the API does."""
    hidden, _ = make_app(tmp_path / "hidden", dashboard=True)
    shown, _ = make_app(tmp_path / "shown", dashboard=True, expose_tracebacks=True)
    pages = []
    for app in (hidden, shown):
        async with serve(app) as client:
            job_id = (await client.post(API, json={"task": "boom"})).json()["id"]
            await wait_status(client, job_id, "failed")
            pages.append((await client.get(f"{DASHBOARD}/{job_id}")).text)

    assert "Traceback (most recent call last)" not in pages[0]
    assert "Traceback (most recent call last)" in pages[1]


async def test_dashboard_unknown_job_is_a_404_page(tmp_path: Path) -> None:
    """A job id that matches nothing gets an HTML page saying so, with status 404."""
    app, _ = make_app(tmp_path, dashboard=True)
    async with serve(app) as client:
        response = await client.get(f"{DASHBOARD}/no-such-job")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "no-such-job" in response.text


async def test_dashboard_bad_filter_is_explained_on_the_page(tmp_path: Path) -> None:
    """An unknown status filter shows the API's reason instead of a JSON error."""
    app, _ = make_app(tmp_path, dashboard=True)
    async with serve(app) as client:
        response = await client.get(DASHBOARD, params={"status": "sleeping"})
    assert response.status_code == 200
    assert "sleeping" in response.text
    assert 'class="flash"' in response.text


async def test_dashboard_serves_its_assets_from_the_package(tmp_path: Path) -> None:
    """The stylesheet and script come from the app; other names are 404."""
    app, _ = make_app(tmp_path, dashboard=True)
    async with serve(app) as client:
        css = await client.get(f"{DASHBOARD}/static/dashboard.css")
        js = await client.get(f"{DASHBOARD}/static/dashboard.js")
        missing = await client.get(f"{DASHBOARD}/static/page.html")
        page = await client.get(DASHBOARD)
    assert css.headers["content-type"].startswith("text/css")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "EventSource" in js.text
    assert missing.status_code == 404
    assert f'src="{DASHBOARD}/static/dashboard.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text


async def test_dashboard_follows_the_router_prefix(tmp_path: Path) -> None:
    """Under another prefix the pages link to that prefix's API and assets."""
    app, _ = make_app(tmp_path, dashboard=True, prefix="/internal")
    async with serve(app) as client:
        page = await client.get("/internal/jobs/_dashboard")
    assert page.status_code == 200
    assert 'data-api="/internal/jobs"' in page.text
    assert 'href="/internal/jobs/_dashboard/static/dashboard.css"' in page.text


async def test_dashboard_is_behind_the_api_dependencies(tmp_path: Path) -> None:
    """Every dashboard route runs the dependencies given for the API (auth)."""

    def token(x_token: str | None = Header(None)) -> None:
        if x_token != "s3cret":
            raise HTTPException(status_code=401, detail="token required")

    app, _ = make_app(tmp_path, dashboard=True, dependencies=[Depends(token)])
    async with serve(app) as client:
        refused = [
            (await client.get(path)).status_code
            for path in (
                DASHBOARD,
                f"{DASHBOARD}/x",
                f"{DASHBOARD}/static/dashboard.js",
            )
        ]
        allowed = await client.get(DASHBOARD, headers={"X-Token": "s3cret"})
    assert refused == [401, 401, 401]
    assert allowed.status_code == 200


async def test_dashboard_is_on_in_the_demo_app(tmp_path: Path) -> None:
    """The demo app serves the dashboard and the metrics."""
    from examples.app import create_app

    app = create_app(db_path=tmp_path / "demo.db", output_dir=tmp_path / "reports")
    async with serve(app) as client:
        page = await client.get(DASHBOARD)
        metrics = await client.get(f"{API}/_metrics")
    assert page.status_code == 200
    assert "corpus" in page.text
    assert metrics.status_code == 200
