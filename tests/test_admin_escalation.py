"""An admin cannot hand out a permission it does not hold."""

from tests.conftest import Admin, Running


async def test_no_escalation_through_admin_creation(running: Running, root: Admin) -> None:
    c = running.client
    r = await c.post(
        "/admins",
        json={"name": "hr", "email": "hr@example.com", "permissions": ["admin:users:create"]},
        headers=root.headers,
    )
    assert r.status_code == 201, r.text
    hr = {"Authorization": f"Bearer {r.json()['key']}"}
    # Creating a super_admin, or an admin with key permissions, is refused.
    for body in (
        {"name": "x", "email": "x@example.com", "role": "super_admin"},
        {"name": "y", "email": "y@example.com", "permissions": ["admin:keys:*"]},
        {"name": "z", "email": "z@example.com", "role": "auditor"},
    ):
        r = await c.post("/admins", json=body, headers=hr)
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "FORBIDDEN"
        assert r.json()["required_permission"].startswith("admin:")
    # What it holds, it may give.
    r = await c.post(
        "/admins",
        json={"name": "w", "email": "w@example.com", "permissions": ["admin:users:create"]},
        headers=hr,
    )
    assert r.status_code == 201, r.text
    names = [a["name"] for a in (await c.get("/admins", headers=root.headers)).json()["items"]]
    assert names.count("x") == names.count("y") == names.count("z") == 0


async def test_no_revoking_a_stronger_admin(running: Running, root: Admin) -> None:
    c = running.client
    r = await c.post(
        "/admins",
        json={"name": "rev", "email": "rev@example.com", "permissions": ["admin:users:revoke"]},
        headers=root.headers,
    )
    assert r.status_code == 201, r.text
    weak = {"Authorization": f"Bearer {r.json()['key']}"}
    r = await c.delete(f"/admins/{root.id}", headers=weak)
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "FORBIDDEN"
    r = await c.get("/health")
    admins = (await c.get("/admins", headers=root.headers)).json()["items"]
    assert {a["name"]: a["status"] for a in admins}["root"] == "active"
