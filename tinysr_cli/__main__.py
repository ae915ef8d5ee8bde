from tinysr_cli.cli.main import main

main()
