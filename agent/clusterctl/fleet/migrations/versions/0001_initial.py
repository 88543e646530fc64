"""The first schema: nodes, events, commands.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("instance_id", sa.String(253), primary_key=True),
        sa.Column("hostname", sa.String(253), nullable=False, server_default=""),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_since", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("boot_id", sa.String(64), nullable=True),
        sa.Column("mac", sa.String(17), nullable=True),
        sa.Column("interface", sa.String(64), nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("interval_s", sa.Integer, nullable=False, server_default="30"),
        sa.Column("gpus", sa.Integer, nullable=False, server_default="0"),
        sa.Column("heartbeat", sa.Text, nullable=True),
        sa.Column("hibernate", sa.Text, nullable=True),
        sa.Column("schedule", sa.Text, nullable=True),
        sa.Column("wake_started_at", sa.Float, nullable=True),
        sa.Column("hibernated_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("idle_gpu_s_avoided", sa.Float, nullable=False, server_default="0"),
    )
    op.create_table(
        "events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("instance_id", sa.String(253), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.UniqueConstraint("instance_id", "event_id", name="events_once"),
    )
    op.create_index("events_by_node", "events", ["instance_id", "seq"])
    op.create_table(
        "commands",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("instance_id", sa.String(253), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("commands_by_node", "commands", ["instance_id", "state"])


def downgrade() -> None:
    op.drop_table("commands")
    op.drop_table("events")
    op.drop_table("nodes")
