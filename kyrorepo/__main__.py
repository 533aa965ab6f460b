from kyrorepo.cli.main import entry

entry()
