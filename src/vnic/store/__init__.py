"""The central database: SQLAlchemy models, Alembic migrations, engine and transactions."""
