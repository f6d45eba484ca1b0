from edgeai.cli import main

main()
