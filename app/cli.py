"""Command-line tools: `flask --app wsgi db|profiles|usage ...`."""

from __future__ import annotations

import os
from datetime import datetime

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from .config import openrouter_key
from .migrations import LATEST, current_version, upgrade
from .profiles import ProfileError, ProfileStore
from .reports import parse_moment, usage_rows

db = AppGroup("db", help="The database schema.")
profiles = AppGroup("profiles", help="Who may call the relay, with which key and models.")
usage = AppGroup("usage", help="The usage ledger.")


def _store() -> ProfileStore:
    return current_app.extensions["relay.profiles"]


def _fail_in_one_line(action):
    def run(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except ProfileError as error:
            raise click.ClickException(str(error)) from None
        except SQLAlchemyError as error:
            # Its message carries the statement's parameters: a sealed key, a token's hash.
            raise click.ClickException(
                f"the database failed the command ({type(error).__name__})"
            ) from None

    run.__name__ = action.__name__
    run.__doc__ = action.__doc__
    return run


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the schema migrations the database has not seen yet."""
    applied = upgrade(current_app.extensions["relay.database"])
    for description in applied:
        click.echo(f"applied migration {description}")
    click.echo(f"schema at version {LATEST}")


@db.command("version")
def db_version() -> None:
    """Print the schema's version."""
    click.echo(current_version(current_app.extensions["relay.database"]))


@profiles.command("create")
@click.argument("name")
@click.option("--openrouter-key-env", metavar="VAR", help="Read this profile's key from $VAR.")
@click.option("--models", "models", multiple=True, metavar="PATTERN", help="Allowed models (glob).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--concurrency", type=click.IntRange(min=1), help="Concurrent streams.")
@click.option("--monthly-budget", type=click.FloatRange(min=0), metavar="USD")
@_fail_in_one_line
def profiles_create(name, openrouter_key_env, models, rpm, concurrency, monthly_budget) -> None:
    """Create a profile and print its token (shown this once, on the last line)."""
    key = None
    if openrouter_key_env:
        key = _key_from(openrouter_key_env)
    token = _store().create(
        name,
        openrouter_key=key,
        models=models,
        rpm=rpm,
        concurrency=concurrency,
        monthly_budget=monthly_budget,
    )
    click.echo(f"created profile {name}; its token (shown once):")
    click.echo(token)


def _key_from(variable: str) -> str:
    try:
        key = openrouter_key(os.environ.get(variable, ""))
    except ValueError as error:
        raise click.ClickException(f"${variable} {error}") from None
    if not key:
        raise click.ClickException(f"${variable} is empty or not set")
    return key


@profiles.command("limit")
@click.argument("name")
@click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute (0: no limit).")
@click.option("--concurrency", type=click.IntRange(min=0), help="Concurrent streams (0: none).")
@click.option("--monthly-budget", type=click.FloatRange(min=0), metavar="USD")
@click.option("--no-budget", is_flag=True, help="Remove the monthly budget.")
@_fail_in_one_line
def profiles_limit(name, rpm, concurrency, monthly_budget, no_budget) -> None:
    """Change a profile's limits; its token stays the same. 0 falls back to DEFAULT_RPM or
    DEFAULT_CONCURRENCY."""
    changes = {}
    if rpm is not None:
        changes["rpm"] = rpm or None
    if concurrency is not None:
        changes["concurrency"] = concurrency or None
    if no_budget:
        changes["monthly_budget"] = None
    elif monthly_budget is not None:
        changes["monthly_budget"] = monthly_budget
    if not changes:
        raise click.UsageError("give --rpm, --concurrency, --monthly-budget or --no-budget")
    _store().set_limits(name, **changes)
    click.echo(f"limits of {name}: " + ", ".join(f"{k} {v or '-'}" for k, v in changes.items()))


@profiles.command("list")
@_fail_in_one_line
def profiles_list() -> None:
    """List profiles (never their tokens or keys)."""
    for profile in _store().all():
        click.echo(
            f"{profile.name}\t{'enabled' if profile.enabled else 'disabled'}\t"
            f"own key: {'yes' if profile.has_own_key else 'no'}\t"
            f"models: {','.join(profile.models) or '*'}\trpm: {profile.rpm or '-'}\t"
            f"concurrency: {profile.concurrency or '-'}\t"
            f"budget: {profile.monthly_budget if profile.monthly_budget is not None else '-'}"
        )


@profiles.command("rotate")
@click.argument("name")
@_fail_in_one_line
def profiles_rotate(name) -> None:
    """Give a profile a new token; the old one stops working at once."""
    token = _store().rotate(name)
    click.echo(f"new token for {name} (the old one no longer works):")
    click.echo(token)


@profiles.command("disable")
@click.argument("name")
@_fail_in_one_line
def profiles_disable(name) -> None:
    """Refuse the profile's token until it is enabled again."""
    _store().set_enabled(name, False)
    click.echo(f"disabled {name}")


@profiles.command("enable")
@click.argument("name")
@_fail_in_one_line
def profiles_enable(name) -> None:
    """Accept the profile's token again."""
    _store().set_enabled(name, True)
    click.echo(f"enabled {name}")


@profiles.command("delete")
@click.argument("name")
@_fail_in_one_line
def profiles_delete(name) -> None:
    """Delete a profile (its usage stays in the ledger)."""
    _store().delete(name)
    click.echo(f"deleted {name}")


class IsoDateTime(click.ParamType):
    """A date or time in ISO 8601, with or without an offset (without one it is UTC)."""

    name = "datetime"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time", param, ctx)


@usage.command("report")
@click.option(
    "--since",
    type=IsoDateTime(),
    help="Only usage from this date or time on (2026-11-01, 2026-11-01T09:30+05:00; UTC "
    "unless an offset is given).",
)
@click.option("--profile", help="Only this profile (or byok:... id).")
def usage_report(since, profile) -> None:
    """Print totals per profile and model."""
    rows = usage_rows(current_app.extensions["relay.database"], since=since, caller=profile)
    click.echo(
        f"{'profile':<24} {'model':<40} {'requests':>8} {'prompt':>10} "
        f"{'completion':>10} {'cost USD':>12}"
    )
    for row in rows:
        click.echo(
            f"{row['caller']:<24} {row['model'] or '-':<40} {row['requests']:>8} "
            f"{row['prompt_tokens']:>10} {row['completion_tokens']:>10} {row['cost']:>12.6f}"
        )


def register(app: Flask) -> None:
    for group in (db, profiles, usage):
        app.cli.add_command(group)
