from tests.conftest import Admin, Running


async def test_health_and_create(running: Running, root: Admin) -> None:
    r = await running.client.get("/health")
    assert r.json() == {"status": "ok", "version": "0.1.0"}
    r = await running.client.post(
        "/keys", json={"name": "a", "owner": "bob", "scopes": ["x:read"]}, headers=root.headers
    )
    assert r.status_code == 201
    assert r.json()["key"].startswith("tg_")
