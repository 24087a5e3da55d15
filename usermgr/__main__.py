from usermgr.cli import main

main()
