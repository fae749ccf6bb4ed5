"""Quick end-to-end."""
from gateway.testing import sample_submission


async def test_online_application_is_accepted_and_delivered(gateway):
    """A valid online application gets 202 and arrives upstream."""
    fields, files = sample_submission("online-application")
    async with gateway.client() as client:
        reply = await client.submit("online-application", fields, files)
    assert reply.status == 202, reply.body
    sim = gateway.sandbox.simulators["dnp-relay"]
    await sim.wait_for(1, timeout=10)
    assert sim.received[0].fields["application_id"] == fields["application_id"]
    assert sim.received[0].files["face_photo"] == files["face_photo"]
